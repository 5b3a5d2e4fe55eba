"""Build the CLIP tokenizer files shipped in mergekit_sdxl/sampler/tokenizer/ (vocab.json, merges.txt).

Source: `open_clip/bpe_simple_vocab_16e6.txt.gz` from the open-clip-torch wheel (MIT, originally OpenAI CLIP).
Get it without installing open_clip:

    .venv/bin/pip download --no-deps open_clip_torch -d /tmp/oc
    unzip -j /tmp/oc/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/oc
    .venv/bin/python scripts/build_tokenizer.py /tmp/oc/bpe_simple_vocab_16e6.txt.gz

Layout (as OpenAI's `SimpleTokenizer` builds it): the 256 byte characters, the same with `</w>`, the 48,894
merges joined, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407): 49,408 tokens.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "mergekit_sdxl" / "sampler" / "tokenizer"
N_MERGES = 49152 - 256 - 2  # 48,894
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merge lines) from the gzipped BPE merges file."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != 49408 or vocab[BOS] != 49406 or vocab[EOS] != 49407:
        raise SystemExit(f"unexpected vocabulary: {len(vocab)} tokens")
    return vocab, merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    vocab, merges = build(args.bpe_gz)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), "utf-8")
    (args.out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
