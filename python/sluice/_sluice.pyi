"""Type stubs of the extension module `sluice._sluice` (the Rust engine). Use the `sluice`
package's API (`sluice.connect`), which wraps it."""

from os import PathLike
from typing import Any, Callable, List, Optional, Tuple, Union

Progress = Optional[Callable[[List[Tuple[str, str]], bool], None]]

__version__: str

class SluiceError(Exception):
    """Every error sluice raises (its one-line message is what the `sluice` command prints)."""

class ConfigError(SluiceError):
    """The configuration (sluice.toml, a dict, a model's setup) is invalid."""

class FunctionDefinitionError(SluiceError):
    """An LLM function definition (udfs/*.toml, a dict, TOML text) is invalid."""

class PlanError(SluiceError):
    """A statement failed: its SQL, an input file or table, or an output."""

class BudgetExceeded(SluiceError):
    """The run's token or cost budget stopped a statement."""

class ProviderError(SluiceError):
    """A model failed for every row, or a row failed under on_error = "fail"."""

class TableError(SluiceError):
    """A Python table could not be read as Arrow."""

def json_to_toml(json: str) -> str:
    """A JSON object as TOML text."""

class Rows:
    """A statement's rows in Arrow memory."""

    def __arrow_c_stream__(self, requested_schema: Optional[object] = None) -> object: ...
    @property
    def is_query(self) -> bool: ...
    @property
    def num_rows(self) -> int: ...
    @property
    def columns(self) -> List[str]: ...
    def format(self, max_rows: int) -> str: ...

class Batch:
    """One batch of a stream's rows (read with `pyarrow.record_batch`)."""

    def __arrow_c_array__(self, requested_schema: Optional[object] = None) -> Tuple[object, object]: ...
    @property
    def num_rows(self) -> int: ...

class Batches:
    """A query's rows, batch by batch as they are computed."""

    def next_batch(self) -> Optional[Batch]: ...
    def close(self) -> None: ...
    @property
    def ended(self) -> bool: ...
    def __arrow_c_schema__(self) -> object: ...
    @property
    def columns(self) -> List[str]: ...

class Session:
    """A session of the engine."""

    def __init__(
        self,
        config: Optional[Tuple[str, str]] = None,
        config_path: Optional[Union[str, PathLike[str]]] = None,
        udfs: Optional[Union[str, PathLike[str]]] = None,
        cache_dir: Optional[Union[str, PathLike[str]]] = None,
        cache: bool = True,
        budget_tokens: Optional[int] = None,
        budget_usd: Optional[float] = None,
    ) -> None: ...
    def sql(self, sql: str, progress: Progress = None) -> Rows: ...
    def run_file(self, path: Union[str, PathLike[str]], progress: Progress = None) -> Rows: ...
    def stream(self, sql: str, progress: Progress = None) -> Batches: ...
    def register_stream(self, name: str, capsule: Any) -> None: ...
    def define_function(self, text: str, origin: str) -> str: ...
    def define_function_json(self, json: str, origin: str) -> str: ...
    def load_functions(self, dir: Union[str, PathLike[str]]) -> List[str]: ...
    def functions_json(self) -> str: ...
    def explain(self, sql: str) -> Tuple[str, str]: ...
    def last_metrics_json(self) -> str: ...
    def metrics_json(self) -> str: ...
