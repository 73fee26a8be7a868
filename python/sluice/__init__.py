"""sluice: SQL in which LLM calls are functions.

The same engine as the ``sluice`` command, from Python::

    import sluice
    con = sluice.connect()                      # sluice.toml, or the embedded model
    con.register("reviews", df)                 # pandas, Polars, PyArrow, ...
    con.define_function({"name": "sentiment", "args": ["text"],
                         "prompt": "Sentiment of: {{ text }}",
                         "output": {"type": "string", "enum": ["pos", "neg"]}})
    con.sql("SELECT text, sentiment(text) AS s FROM reviews").to_pandas()

Statements run with the GIL released, showing their progress in a terminal or a notebook;
Ctrl-C (or interrupting a notebook cell) raises ``KeyboardInterrupt`` within two seconds and
keeps every answer received in the cache, so running the statement again sends only the rest.
``con.stream(sql)`` hands a large result over batch by batch as it is computed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Union

from . import _progress, _sluice
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
    "Stream",
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
    progress: Union[None, bool, str, Callable[[list, bool], None]] = None,
) -> "Session":
    """Opens a session.

    ``config`` is a path to a ``sluice.toml``, a dict with its keys, or ``None`` for what the
    ``sluice`` command finds (``$SLUICE_CONFIG``, ``./sluice.toml``, else the embedded model).
    ``udfs`` is the directory of function definitions (default: the config's ``udf_dir``,
    ``./udfs``), ``cache_dir`` the response cache (default ``.sluice/cache``); ``cache=False``
    neither reads nor writes it. ``budget_usd`` and ``budget_tokens`` stop a statement
    (``BudgetExceeded``) before the session's spending would pass them.

    ``progress`` is how statements show their progress: ``None`` (the default) draws it in a
    Jupyter notebook or on a terminal's stderr, and nowhere else; ``True`` also writes the last
    state to stderr when neither; ``False`` draws nothing; ``"terminal"``, ``"notebook"`` or
    ``"plain"`` choose; a callable is called with ``(lines, finished)``, ``lines`` being a list
    of ``(function or batch job, text)``.
    """
    progress = _progress.check(progress)
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
    return Session(inner, progress)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class _Frames:
    """``to_pandas()`` and ``to_polars()`` of anything with ``to_arrow()``."""

    def to_arrow(self) -> "Any":  # pragma: no cover - every subclass defines it
        raise NotImplementedError

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


class Result(_Frames):
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


class Stream(_Frames):
    """The rows of a query as they are computed, batch by batch (``Session.stream``).

    Iterating gives ``pyarrow.RecordBatch``es; each is computed when it is asked for, so a
    result larger than memory can be written out as it comes. Any Arrow consumer reads it
    through ``__arrow_c_stream__`` (``pyarrow.RecordBatchReader.from_stream(s)``,
    ``polars.from_arrow``, DuckDB). A stream is read once. ``close()`` (or leaving a ``with``
    block) stops the statement: its calls on the wire are dropped, the answers received stay in
    the cache. ``to_arrow()``, ``to_pandas()`` and ``to_polars()`` read the rest of the rows.
    """

    def __init__(self, batches: "_sluice.Batches") -> None:
        self._batches = batches

    @property
    def schema(self) -> "Any":
        """The rows' ``pyarrow.Schema``."""
        import pyarrow as pa

        return pa.schema(self._batches)

    @property
    def columns(self) -> list:
        """The column names."""
        return self._batches.columns

    def __iter__(self) -> Iterator["Any"]:
        return self

    def __next__(self) -> "Any":
        import pyarrow as pa

        batch = self._batches.next_batch()
        if batch is None:
            raise StopIteration
        return pa.record_batch(batch)

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        """The rest of the rows as an Arrow C stream (the Arrow PyCapsule interface)."""
        import pyarrow as pa

        reader = pa.RecordBatchReader.from_batches(self.schema, self)
        return reader.__arrow_c_stream__(requested_schema)

    def to_arrow(self) -> "Any":
        """The rest of the rows as a ``pyarrow.Table``."""
        import pyarrow as pa

        return pa.Table.from_batches(list(self), schema=self.schema)

    def close(self) -> None:
        """Stops the statement and frees what it holds (nothing happens once it has ended)."""
        self._batches.close()

    @property
    def ended(self) -> bool:
        """Whether every batch was read, or the stream closed."""
        return self._batches.ended

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "ended" if self.ended else "open"
        return f"<sluice stream: {state}, columns {self.columns}>"


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

    def __init__(self, inner: "_sluice.Session", progress: Any = None) -> None:
        self._inner = inner
        self._progress = progress

    def _display(self, progress: Any) -> Any:
        setting = self._progress if progress is None else _progress.check(progress)
        return _progress.display_for(setting)

    def sql(self, sql: str, *, progress: Any = None) -> Result:
        """Runs every statement of ``sql`` in order (stopping at the first failure) and returns
        the rows of the last one when it is a query. ``progress`` overrides the session's
        setting (see :func:`connect`)."""
        return Result(self._inner.sql(sql, self._display(progress)))

    def run_file(self, path: PathLike, *, progress: Any = None) -> Result:
        """Runs a ``.sql`` file as ``sluice run`` does; returns the last statement's rows."""
        return Result(self._inner.run_file(os.fspath(path), self._display(progress)))

    def stream(self, sql: str, *, progress: Any = None) -> Stream:
        """Runs every statement of ``sql`` but the last, starts the last and returns its rows
        as a :class:`Stream`: each batch is computed when it is read. On a cluster, the
        statement runs again on the workers left only if workers die before its first batch
        (``sql()`` collects every row first, so it always can)."""
        return Stream(self._inner.stream(sql, self._display(progress)))

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
