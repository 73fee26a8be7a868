"""sluice from Python: a pandas DataFrame through an LLM function, back as pandas.

    python python/examples/quickstart.py                 # the embedded model (models/)
    SLUICE_BASE_URL=http://127.0.0.1:8000/v1 python python/examples/quickstart.py

With SLUICE_BASE_URL, the model is that OpenAI-compatible server (vLLM, Ollama, the project's
test server `sluice-mock-llm`); its key, if it needs one, in OPENAI_API_KEY.
"""

import os
import sys
import tempfile

import pandas as pd
import sluice


def main() -> int:
    config = None
    base_url = os.environ.get("SLUICE_BASE_URL")
    if base_url:
        model = {"kind": "openai", "base_url": base_url, "model": os.environ.get("SLUICE_MODEL", "mock")}
        if os.environ.get("OPENAI_API_KEY"):
            model["api_key_env"] = "OPENAI_API_KEY"
        config = {"models": {"default": model}}
    cache_dir = os.environ.get("SLUICE_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "sluice-quickstart")
    con = sluice.connect(config, udfs="udfs", cache_dir=cache_dir)

    reviews = pd.DataFrame(
        {
            "id": [1, 2, 3],
            "text": [
                "Arrived early and works perfectly.",
                "Broke after two days; the seller never answered.",
                "Fine for the price.",
            ],
        }
    )
    con.register("reviews", reviews)
    con.define_function(
        {
            "name": "sentiment",
            "args": ["text"],
            "prompt": "Is this product review positive, negative or neutral?\n\n{{ text }}",
            "output": {"type": "string", "enum": ["positive", "negative", "neutral"]},
            "max_tokens": 8,
        }
    )
    query = "SELECT id, text, sentiment(text) AS sentiment, sentiment_error(text) AS error FROM reviews"
    print(con.explain(query))
    out = con.sql(query).to_pandas().sort_values("id")
    print(out[["id", "sentiment"]].to_string(index=False))
    print(f"{con.metrics()['requests']} requests, {con.metrics()['cache_hits']} answered by the cache")
    return 0 if out["sentiment"].notna().all() else 1


if __name__ == "__main__":
    sys.exit(main())
