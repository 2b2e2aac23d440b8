"""Text benchmark: a BERT classifier served text over HTTP against the transformers pipeline.

    python bench/text.py --device cuda       # the GPU host: BERT-base-sized, 8 front ends, 256 connections
    python bench/text.py --quick             # the 2-core machine: a small BERT, 1 front end, 16 connections

What runs (side by side, one run, the same texts):

* the model: a ``BertForSequenceClassification`` with random weights (BERT-base's sizes: 12
  layers, hidden 768, 12 heads, vocab 30,522), written here with ``save_pretrained`` beside a
  WordPiece ``tokenizer.json`` (made with ``tokenizers``; nothing comes from the network);
* the texts: mixed lengths, 16 to 256 tokens each (uniform), random words of the vocabulary;
* ``pipeline_rps``: ``transformers.pipeline("text-classification")`` on the same device, batch
  64, over every text (after one warm-up batch);
* ``text_rps``: a real ``modelconsole --serve --workers N`` subprocess (the front ends tokenize,
  the engine batches by length bucket), fed by load processes holding keep-alive connections,
  each sending one text per request (V2 JSON ``text``, BYTES), every answer's status checked;
* ``padding_waste``: the server's own figure (padded positions per real token, from describe),
  after the run; beside it, the waste each bucket choice gives on the same lengths (the table
  docs/benchmarks.md weighs buckets by).

The LAST line is one JSON object with exactly ``text_rps``, ``pipeline_rps``,
``text_vs_pipeline`` (text_rps / pipeline_rps) and ``padding_waste``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/http.py would shadow the standard library's http package: this folder goes to the END
# of the import path (serveproc.py is still found there)
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse  # noqa: E402
import asyncio
import json
import multiprocessing as mp
import os
import random
import re
import socket
import tempfile
import time
import urllib.request

from serveproc import control_token, start_server  # noqa: E402

_CL = re.compile(rb"\r\ncontent-length: *(\d+)", re.I)
BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
SMALL = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256}
VOCAB = 30522


def make_model(folder: Path, sizes: dict[str, int]) -> None:
    """A random BERT classifier and a WordPiece tokenizer over a made-up vocabulary: one token a word."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *(f"w{i}" for i in range(VOCAB - 4))])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]", "model_max_length": 512}))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=512, num_labels=2,
                                  id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
                                  **sizes)
    transformers.BertForSequenceClassification(cfg).eval().save_pretrained(folder)


def make_texts(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` texts of 16..256 tokens (the words plus [CLS] and [SEP]), and their token counts."""
    rng = random.Random(seed)
    texts, lengths = [], []
    for _ in range(n):
        words = rng.randint(14, 254)
        texts.append(" ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(words)))
        lengths.append(words + 2)
    return texts, lengths


def pipeline_rps(folder: Path, texts: list[str], device: str, batch: int = 64) -> float:
    import torch
    import transformers

    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="[PAD]",
                                               unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                               model_max_length=512)
    model = transformers.BertForSequenceClassification.from_pretrained(folder).eval()
    pipe = transformers.pipeline("text-classification", model=model, tokenizer=tok, device=torch.device(device),
                                 batch_size=batch)
    pipe(texts[:batch])  # warm-up: kernels, allocator
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = pipe(texts)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert len(out) == len(texts) and all(o["label"] in ("NEGATIVE", "POSITIVE") for o in out)
    return len(texts) / seconds


# --------------------------------------------------------------------------- load (child processes)


def _request(text: str, port: int) -> bytes:
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}).encode()
    return (b"POST /v2/models/bert/infer HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (port, len(body)) + body)


async def _connection(port: int, requests: list[bytes], start_at: float, stop_at: float, out: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    k = 0
    try:
        while time.time() < stop_at:
            writer.write(requests[k % len(requests)])
            k += 1
            head = await reader.readuntil(b"\r\n\r\n")
            m = _CL.search(head)
            body = await reader.readexactly(int(m.group(1))) if m else b""
            if head[9:12] != b"200":
                out[1] += 1
                if out[1] == 1:
                    print("first error:", head[:12], body[:300], file=sys.stderr)
            elif time.time() >= start_at:
                out[0] += 1
    finally:
        writer.close()


def _load(port: int, texts: list[str], conns: int, start_at: float, stop_at: float, q: mp.Queue) -> None:
    requests = [_request(t, port) for t in texts]
    out = [0, 0]

    async def run() -> None:
        await asyncio.gather(*(_connection(port, requests[i::conns] or requests, start_at, stop_at, out)
                               for i in range(conns)))

    asyncio.run(run())
    q.put(out)


def text_rps(port: int, texts: list[str], conns: int, procs: int, warmup_s: float, seconds: float) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 2.0 + warmup_s
    stop_at = start_at + seconds
    per = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    ps = [ctx.Process(target=_load, args=(port, texts[i::procs], n, start_at, stop_at, q)) for i, n in enumerate(per)]
    for p in ps:
        p.start()
    done = errors = 0
    for _ in ps:
        ok, bad = q.get(timeout=seconds + warmup_s + 300)
        done, errors = done + ok, errors + bad
    for p in ps:
        p.join()
    return done / seconds, errors


def server_waste(tmp: Path, port: int) -> float | None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/models",
                                 headers={"Authorization": f"Bearer {control_token(tmp, port)}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        models = json.loads(r.read())["models"]
    text = next(m for m in models if m["name"] == "bert").get("text") or {}
    return text.get("padding_waste")


def main(argv: list[str] | None = None) -> int:
    from modelconsole.scheduler.textenc import default_buckets, padding_waste

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (the GPU host)")
    p.add_argument("--quick", action="store_true", help="the 2-core machine: a small BERT, short rows")
    p.add_argument("--workers", type=int, default=None, help="front-end processes (default 8; 1 with --quick)")
    p.add_argument("--connections", type=int, default=None, help="open connections (default 256; 16 with --quick)")
    p.add_argument("--texts", type=int, default=None, help="distinct texts (default 4096; 256 with --quick)")
    p.add_argument("--seconds", type=float, default=None, help="measured seconds (default 20; 5 with --quick)")
    p.add_argument("--buckets", default=None, help="the server's buckets, e.g. 32,64,96 (default: powers of two)")
    args = p.parse_args(argv)
    quick = args.quick
    workers = args.workers if args.workers is not None else (1 if quick else 8)
    conns = args.connections or (16 if quick else 256)
    n = args.texts or (256 if quick else 4096)
    seconds = args.seconds or (5.0 if quick else 20.0)
    procs = 1 if quick else max(1, min(4, (os.cpu_count() or 2) - workers - 2))
    texts, lengths = make_texts(n)

    print(f"text benchmark: {'small' if quick else 'BERT-base-sized'} classifier on {args.device}, {n} texts of "
          f"16-256 tokens, --workers {workers}, {conns} connections from {procs} load processes")
    print("\nbucket choice (padding waste = padded / real tokens; one text per request, as the load sends):")
    choices = {"powers of two (default)": default_buckets(512), "multiples of 32": tuple(range(32, 513, 32)),
               "multiples of 64": tuple(range(64, 513, 64)), "one bucket (512)": (512,)}
    for label, buckets in choices.items():
        print(f"  {label:26s} {len(buckets):3d} shapes  waste {padding_waste(lengths, buckets):.3f}")
    print(f"  {'the pipeline: each batch of 64 padded to its longest':52s} waste "
          f"{padding_waste(lengths, tuple(range(1, 513)), 64):.3f}")

    with tempfile.TemporaryDirectory(prefix="mc-text-") as d:
        tmp = Path(d)
        make_model(tmp / "bert", SMALL if quick else BASE)
        pipe = pipeline_rps(tmp / "bert", texts, args.device)
        print(f"\npipeline (batch 64): {pipe:9.1f} texts/s")
        port = _free_port()
        config = (f'[[models]]\nname = "bert"\nsource = "hf:bert"\ndevice = "{args.device}"\nwarmup = 1\n'
                  "max_batch_size = 64\nmax_queue_delay_ms = 2\nmax_queue_size = 4096\n"
                  + (f"buckets = [{args.buckets}]\n" if args.buckets else ""))
        server = start_server(tmp, port, config, ["--workers", str(workers), "--grpc-port", "off"])
        try:
            served, errors = text_rps(port, texts, conns, procs, 3.0 if quick else 5.0, seconds)
            waste = server_waste(tmp, port)
        finally:
            server.terminate()
            server.wait(60)
    print(f"served over HTTP:    {served:9.1f} texts/s  ({errors} errors)  server padding waste "
          f"{waste if waste is None else round(waste, 3)}")
    ratio = served / pipe if pipe else None
    print(f"text_vs_pipeline:    {ratio:.2f}" if ratio is not None else "text_vs_pipeline: —")
    print(json.dumps({"text_rps": round(served, 1), "pipeline_rps": round(pipe, 1),
                      "text_vs_pipeline": round(ratio, 3) if ratio is not None else None,
                      "padding_waste": round(waste, 3) if waste is not None else None}))
    return 1 if errors else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
