"""Bad input raises the right exception, with the one-line message `sluice` prints; no API key
appears in any exception or repr."""

import subprocess

import pandas as pd
import pyarrow as pa
import pytest
import sluice

from conftest import SLUICE_BIN

SECRET = "sk-test-Zq81mD0nTl3aK"


def _one_line(e):
    text = str(e.value)
    assert text and "\n" not in text
    return text


def test_the_hierarchy():
    for cls in (sluice.ConfigError, sluice.FunctionDefinitionError, sluice.PlanError,
                sluice.BudgetExceeded, sluice.ProviderError, sluice.TableError):
        assert issubclass(cls, sluice.SluiceError)
    assert issubclass(sluice.SluiceError, Exception)


def test_unknown_function_keys(tmp_path, mock):
    con = sluice.connect(mock.config(), udfs=tmp_path / "none", cache=False)
    with pytest.raises(sluice.FunctionDefinitionError) as e:
        con.define_function({"name": "f", "args": ["x"], "prompt": "{{ x }}", "temprature": 0.5})
    assert "temprature" in _one_line(e)
    with pytest.raises(sluice.FunctionDefinitionError) as e:
        con.define_function('name = "g"\nprompt = "{{ y }}"\n')  # y is not an argument
    _one_line(e)
    # A name SQL already has is refused, and nothing was half-registered.
    with pytest.raises(sluice.FunctionDefinitionError) as e:
        con.define_function({"name": "upper", "args": ["x"], "prompt": "{{ x }}"})
    assert "already a SQL function" in _one_line(e)
    assert [f["name"] for f in con.functions()] == ["llm"]


def test_bad_configuration(tmp_path):
    with pytest.raises(sluice.ConfigError) as e:
        sluice.connect({"dispatcher": {"concurency": 3}}, cache=False)
    assert "concurency" in _one_line(e)
    with pytest.raises(sluice.ConfigError) as e:
        sluice.connect(tmp_path / "missing.toml")
    assert "missing.toml" in _one_line(e)
    with pytest.raises(sluice.ConfigError):
        sluice.connect({}, budget_usd=-1)


def test_a_dataframe_column_of_the_wrong_type(tmp_path, mock):
    con = sluice.connect(mock.config(), udfs=tmp_path / "none", cache=False)
    mixed = pd.DataFrame({"text": ["a", 1, {"k": 2}]})
    with pytest.raises(sluice.TableError) as e:
        con.register("t", mixed)
    assert _one_line(e).startswith("table t:")
    # A column whose type the SQL cannot use fails when planned.
    con.register("n", pd.DataFrame({"x": [1, 2]}))
    with pytest.raises(sluice.PlanError) as e:
        con.sql("SELECT cosine_similarity(x, x) FROM n")
    _one_line(e)
    with pytest.raises(TypeError):
        con.register("bad", object())


def test_a_missing_file_says_what_sluice_run_says(tmp_path, mock, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION 'nowhere/t.parquet';\nSELECT * FROM t;"
    (tmp_path / "q.sql").write_text(script)
    (tmp_path / "sluice.toml").write_text(mock.toml(tmp_path / "none", tmp_path / "cache"))
    cli = subprocess.run([str(SLUICE_BIN), "--config", "sluice.toml", "run", "q.sql", "-q"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode != 0
    cli_line = [l for l in cli.stderr.splitlines() if l.startswith("error: ")][0]
    con = sluice.connect(tmp_path / "sluice.toml")
    with pytest.raises(sluice.PlanError) as e:
        con.run_file("q.sql")
    assert "error: " + _one_line(e) == cli_line
    with pytest.raises(sluice.PlanError) as e:
        con.register_parquet("p", tmp_path / "absent.parquet")
    assert "absent.parquet" in _one_line(e)
    with pytest.raises(sluice.PlanError):
        con.run_file(tmp_path / "absent.sql")


def test_budget_exceeded(tmp_path, mock):
    con = sluice.connect(mock.config(), udfs=tmp_path / "none", cache=False, budget_tokens=30)
    con.define_function({"name": "f", "args": ["x"], "prompt": "Say something about {{ x }}"})
    con.register("t", pa.table({"x": [f"row {i}" for i in range(200)]}))
    with pytest.raises(sluice.BudgetExceeded) as e:
        con.sql("SELECT f(x) FROM t")
    assert "budget" in _one_line(e)


def test_provider_errors_never_show_the_key(tmp_path, mock_factory, monkeypatch):
    monkeypatch.setenv("SLUICE_PY_SERVER_KEY", "the-right-key")
    monkeypatch.setenv("SLUICE_PY_TEST_KEY", SECRET)
    server = mock_factory("--api-key-env", "SLUICE_PY_SERVER_KEY")
    cfg = server.config()
    cfg["models"]["default"]["api_key_env"] = "SLUICE_PY_TEST_KEY"
    con = sluice.connect(cfg, udfs=tmp_path / "none", cache=False)
    con.define_function({"name": "f", "args": ["x"], "prompt": "{{ x }}", "on_error": "fail"})
    con.register("t", pa.table({"x": ["a", "b"]}))
    with pytest.raises(sluice.ProviderError) as e:
        con.sql("SELECT f(x) FROM t")
    texts = [str(e.value), repr(e.value), repr(con), str(con.metrics()), repr(con.functions())]
    _one_line(e)
    assert not any(SECRET in t for t in texts)
    # on_error = "fail": one row's failure fails the statement.
    ok = mock_factory("--invalid-schema", "1")
    con2 = sluice.connect(ok.config(max_attempts=1), udfs=tmp_path / "none", cache=False)
    con2.define_function({"name": "g", "args": ["x"], "prompt": "{{ x }}", "on_error": "fail",
                          "output": {"type": "object", "properties": {"n": {"type": "integer"}},
                                     "required": ["n"]}})
    con2.register("t", pa.table({"x": ["a"]}))
    with pytest.raises(sluice.ProviderError) as e:
        con2.sql("SELECT g(x) FROM t")
    assert SECRET not in str(e.value)
