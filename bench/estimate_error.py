"""How far the prompt estimate (about 4 characters per token) is from tiktoken's exact count.

    TIKTOKEN_CACHE_DIR=<dir with the encodings> python bench/estimate_error.py [--encoding o200k_base]

Prints a Markdown table (docs/quotas.md, "Prompt counting"): per kind of text, its characters, the
estimate, the exact count and the estimate's error. Texts are this repository's own files and fixed
generated samples, so the numbers are reproducible.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
from collections.abc import Callable
from pathlib import Path

from llmroute_sidecar.openai.tokens import estimate_text_tokens

ROOT = Path(__file__).resolve().parent.parent
CJK = (
    "大规模语言模型的推理服务需要在多个副本之间共享配额\uff0c否则每个副本各自限流会让整体超出供应商的限制。"
    "東京の天気は晴れのち曇り、夕方から雨が降る見込みです。傘を持って出かけてください。"
)


def samples() -> dict[str, str]:
    rng = random.Random(7)
    records = [
        {"id": i, "price": round(rng.uniform(0, 1000), 2), "sku": f"A{rng.randrange(10**6):06d}"}
        for i in range(400)
    ]
    return {
        "English prose (README.md)": (ROOT / "README.md").read_text(),
        "English technical docs (docs/quotas.md)": (ROOT / "docs" / "quotas.md").read_text(),
        "Python code (sidecar/llmroute_sidecar/proxy.py)": (
            ROOT / "sidecar/llmroute_sidecar/proxy.py"
        ).read_text(),
        "JSON with numbers": json.dumps(records),
        "Chinese and Japanese": CJK * 40,
        "base64": base64.b64encode(rng.randbytes(12_000)).decode(),
    }


def table(count: Callable[[str], int]) -> str:
    lines = [
        "| text | characters | estimate | tiktoken | estimate error |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, text in samples().items():
        estimate, exact = estimate_text_tokens(text), count(text)
        lines.append(f"| {name} | {len(text):,} | {estimate:,} | {exact:,} | {estimate / exact - 1:+.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoding", default="o200k_base", help="tiktoken encoding (default o200k_base)")
    args = parser.parse_args()
    import tiktoken

    encoding = tiktoken.get_encoding(args.encoding)
    print(f"estimate vs {args.encoding}\n")
    print(table(lambda text: len(encoding.encode_ordinary(text))))


if __name__ == "__main__":
    main()
