"""sluice: SQL in which LLM calls are functions.

The same engine as the ``sluice`` command, from Python::

    import sluice
    con = sluice.connect()                      # sluice.toml, or the embedded model
    con.register("reviews", df)                 # pandas, Polars, PyArrow, ...
    con.define_function({"name": "sentiment", "args": ["text"],
                         "prompt": "Sentiment of: {{ text }}",
                         "output": {"type": "string", "enum": ["pos", "neg"]}})
    con.sql("SELECT text, sentiment(text) AS s FROM reviews").to_pandas()

Statements run with the GIL released; Ctrl-C (or interrupting a notebook cell) raises
``KeyboardInterrupt`` within two seconds and keeps every answer received in the cache, so
running the statement again sends only the rest.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping, Optional, Union

from . import _sluice
from ._sluice import (
    BudgetExceeded,
    ConfigError,
    FunctionDefinitionError,
    PlanError,
    ProviderError,
    SluiceError,
    TableError,
)

__all__ = [
    "connect",
    "Session",
    "Result",
    "Explanation",
    "SluiceError",
    "ConfigError",
    "FunctionDefinitionError",
    "PlanError",
    "BudgetExceeded",
    "ProviderError",
    "TableError",
]

__version__ = _sluice.__version__

PathLike = Union[str, "os.PathLike[str]"]


def _toml_text(config: Mapping[str, Any]) -> str:
    """A dict as sluice.toml text (through JSON: the same keys and values)."""
    return _sluice_toml(json.dumps(config))


def _sluice_toml(json_text: str) -> str:
    # TOML has no writer in the standard library; the extension converts (keys keep their order).
    return _sluice.json_to_toml(json_text)


def connect(
    config: Union[None, PathLike, Mapping[str, Any]] = None,
    *,
    udfs: Optional[PathLike] = None,
    cache_dir: Optional[PathLike] = None,
    cache: bool = True,
    budget_usd: Optional[float] = None,
    budget_tokens: Optional[int] = None,
) -> "Session":
    """Opens a session.

    ``config`` is a path to a ``sluice.toml``, a dict with its keys, or ``None`` for what the
    ``sluice`` command finds (``$SLUICE_CONFIG``, ``./sluice.toml``, else the embedded model).
    ``udfs`` is the directory of function definitions (default: the config's ``udf_dir``,
    ``./udfs``), ``cache_dir`` the response cache (default ``.sluice/cache``); ``cache=False``
    neither reads nor writes it. ``budget_usd`` and ``budget_tokens`` stop a statement
    (``BudgetExceeded``) before the session's spending would pass them.
    """
    text = None
    path = None
    if isinstance(config, Mapping):
        text = (_toml_text(config), "<config>")
    elif config is not None:
        path = os.fspath(config)
    inner = _sluice.Session(
        config=text,
        config_path=path,
        udfs=None if udfs is None else os.fspath(udfs),
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        cache=cache,
        budget_tokens=budget_tokens,
        budget_usd=budget_usd,
    )
    return Session(inner)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class Result:
    """The rows of a statement, in Arrow memory (empty for a statement that is not a query).

    Any Arrow consumer reads it without a copy through ``__arrow_c_stream__``
    (``pyarrow.table(result)``, ``polars.from_arrow``, DuckDB).
    """

    def __init__(self, rows: "_sluice.Rows") -> None:
        self._rows = rows

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        """The Arrow C stream of the rows (the Arrow PyCapsule interface)."""
        return self._rows.__arrow_c_stream__(requested_schema)

    @property
    def num_rows(self) -> int:
        """The number of rows."""
        return self._rows.num_rows

    @property
    def columns(self) -> list:
        """The column names."""
        return self._rows.columns

    def __len__(self) -> int:
        return self._rows.num_rows

    def to_arrow(self) -> "Any":
        """The rows as a ``pyarrow.Table`` (no copy)."""
        import pyarrow as pa

        if not self._rows.is_query:
            return pa.table({})
        return pa.RecordBatchReader.from_stream(self).read_all()

    def to_pandas(self) -> "Any":
        """The rows as a ``pandas.DataFrame``."""
        return self.to_arrow().to_pandas()

    def to_polars(self) -> "Any":
        """The rows as a ``polars.DataFrame`` (needs polars installed)."""
        try:
            import polars as pl
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("to_polars() needs polars: pip install polars") from e
        return pl.from_arrow(self.to_arrow())

    def to_pylist(self) -> list:
        """The rows as a list of dicts."""
        return self.to_arrow().to_pylist()

    def __iter__(self) -> Iterator["Any"]:
        """The rows as ``pyarrow.RecordBatch``es."""
        return iter(self.to_arrow().to_batches())

    def show(self, max_rows: int = 20) -> None:
        """Prints the first ``max_rows`` rows as ``sluice run`` does, then the row count."""
        print(self._rows.format(max_rows))

    def __str__(self) -> str:
        return self._rows.format(20)

    def __repr__(self) -> str:
        return repr(self._rows)


class Explanation:
    """What a script would do and cost, without calling any model (``sluice explain``)."""

    def __init__(self, data: dict, text: str) -> None:
        self._data = data
        self._text = text
        total = data.get("total") or {}
        #: LLM calls the script makes.
        self.calls: int = int(total.get("calls", 0))
        #: Calls the cache answers.
        self.cached: int = int(total.get("cached", 0))
        #: Prompt tokens of the requests it would send.
        self.tokens_in: int = int(total.get("tokens_in", 0))
        #: Completion tokens (estimated from the output schemas).
        self.tokens_out: int = int(total.get("tokens_out", 0))
        #: Cost in USD at the models' prices (``None`` without prices).
        self.cost_usd: Optional[float] = total.get("cost_usd")

    def to_dict(self) -> dict:
        """The estimate as ``sluice explain --json`` prints it."""
        return self._data

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return (
            f"<sluice explanation: {self.calls} calls, {self.tokens_in} tokens in, "
            f"{self.tokens_out} tokens out, cost_usd={self.cost_usd}>"
        )


def _arrow_stream_capsule(name: str, data: Any) -> Any:
    """The Arrow C stream of a table-like object (``__arrow_c_stream__``; pandas through
    pyarrow)."""
    if hasattr(data, "__arrow_c_stream__"):
        try:
            return data.__arrow_c_stream__()
        except (TypeError, ValueError) as e:
            raise TableError(f"table {name}: {_one_line(e)}") from None
        except Exception as e:  # pyarrow's ArrowInvalid and friends
            if type(e).__module__.startswith("pyarrow"):
                raise TableError(f"table {name}: {_one_line(e)}") from None
            raise
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover
        pd = None
    if pd is not None and isinstance(data, pd.DataFrame):
        import pyarrow as pa

        try:
            return pa.Table.from_pandas(data, preserve_index=False).__arrow_c_stream__()
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
            raise TableError(f"table {name}: {_one_line(e)}") from None
    raise TypeError(
        f"table {name}: expected a pandas, Polars or PyArrow table (an object with "
        f"__arrow_c_stream__), got {type(data).__name__}"
    )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class Session:
    """A sluice session: SQL with LLM functions over files and Python tables. Open one with
    :func:`connect`."""

    def __init__(self, inner: "_sluice.Session") -> None:
        self._inner = inner

    def sql(self, sql: str) -> Result:
        """Runs every statement of ``sql`` in order (stopping at the first failure) and returns
        the rows of the last one when it is a query."""
        return Result(self._inner.sql(sql))

    def run_file(self, path: PathLike) -> Result:
        """Runs a ``.sql`` file as ``sluice run`` does; returns the last statement's rows."""
        return Result(self._inner.run_file(os.fspath(path)))

    def register(self, name: str, data: Any) -> "Session":
        """Registers a table: a pandas, Polars or PyArrow table, or anything with
        ``__arrow_c_stream__``. It replaces a table of the same name."""
        self._inner.register_stream(name, _arrow_stream_capsule(name, data))
        return self

    def _external(self, name: str, kind: str, location: PathLike, options: str = "") -> "Session":
        loc = os.fspath(location)
        if "://" not in loc and not any(c in loc for c in "*?[") and not os.path.exists(loc):
            raise PlanError(f"table {name}: {loc} does not exist")
        self._inner.sql(
            f"DROP TABLE IF EXISTS {_quote_ident(name)};\n"
            f"CREATE EXTERNAL TABLE {_quote_ident(name)} STORED AS {kind} "
            f"LOCATION {_quote_text(loc)}{options}"
        )
        return self

    def register_parquet(self, name: str, location: PathLike) -> "Session":
        """Registers Parquet files (a file, a directory or an ``s3://``, ``gs://``, ``az://``
        location) as a table."""
        return self._external(name, "PARQUET", location)

    def register_json(self, name: str, location: PathLike, bad_rows: str = "fail") -> "Session":
        """Registers JSON-lines files as a table; ``bad_rows`` is ``fail``, ``skip`` or
        ``null`` for malformed lines."""
        return self._external(
            name, "JSON", location, f" OPTIONS ('bad_rows' {_quote_text(bad_rows)})"
        )

    def register_csv(self, name: str, location: PathLike, has_header: bool = True) -> "Session":
        """Registers CSV files as a table."""
        header = "true" if has_header else "false"
        return self._external(
            name, "CSV", location, f" OPTIONS ('format.has_header' '{header}')"
        )

    def define_function(self, definition: Union[Mapping[str, Any], str]) -> str:
        """Adds an LLM function from a dict or TOML text with the keys of ``udfs/*.toml``
        (``name``, ``args``, ``prompt``, ``output``, ``model``, ...); returns its name."""
        if isinstance(definition, Mapping):
            name = definition.get("name", "function")
            return self._inner.define_function_json(
                json.dumps(dict(definition)), f"<function {name}>"
            )
        if isinstance(definition, str):
            return self._inner.define_function(definition, "<function>")
        raise TypeError(
            f"define_function: expected a dict or TOML text, got {type(definition).__name__}"
        )

    def load_functions(self, directory: PathLike) -> list:
        """Adds the functions of every ``*.toml`` file of ``directory``; returns their names."""
        return self._inner.load_functions(os.fspath(directory))

    def functions(self) -> list:
        """The LLM functions available in SQL (the built-in ``llm`` first), as dicts."""
        return json.loads(self._inner.functions_json())

    def explain(self, sql: str) -> Explanation:
        """Estimates a script's LLM calls, tokens and cost without calling any model."""
        data, text = self._inner.explain(sql)
        return Explanation(json.loads(data), text)

    def metrics(self) -> dict:
        """The counters of the last statement run (calls, requests, tokens, cost, cache hits,
        retries and errors, per function and model)."""
        return json.loads(self._inner.last_metrics_json())

    def session_metrics(self) -> dict:
        """The counters since the session started (or was built again after an interrupt)."""
        return json.loads(self._inner.metrics_json())

    def __repr__(self) -> str:
        return repr(self._inner)
