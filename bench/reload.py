"""Reload and cold-load speed on a real GPU, against the hardware measured in the same run.

    python bench/reload.py            # a 2 GiB model (needs CUDA)
    python bench/reload.py --gib 4

Measures, side by side:
- the pinned host -> device copy bandwidth of one buffer of the model's size
  (the ceiling for a reload from the host-memory tier), and the engine's
  reload of the model from its host tier (unload, then load);
- ``safetensors.torch.load_file(path, device="cuda")`` of the model's file
  (the file is read once first so both read it from the page cache), and the
  engine's cold load of the same file through a factory.

- an ``hf:`` folder the size of BERT-base (``BertForMaskedLM``, 110 M
  parameters, random weights written here with ``save_pretrained``): the
  engine's cold load against transformers' own ``from_pretrained`` of the
  same folder followed by ``.to("cuda")`` (its ``device_map`` needs the
  accelerate package), and the engine's host-tier reload against a pinned
  copy of the same size (``--no-hf`` skips this part; it needs transformers).

Last line: one JSON object with host_tier_reload_gbps, pinned_copy_gbps,
reload_vs_pinned (target >= 0.70), cold_load_s, load_file_s,
cold_vs_load_file (target <= 1.2), hf_cold_vs_from_pretrained (target
<= 1.0) and hf_reload_vs_pinned (target >= 0.8).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# `python bench/reload.py` puts bench/ first on sys.path, where bench/http.py shadows the stdlib's
# http (which torch imports): take bench/ off the path before importing torch.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

FACTORY = '''
import torch


class Big(torch.nn.Module):
    """Weights of a chosen size in a few large matrices, and a cheap forward."""

    def __init__(self, gib=2.0, parts=8):
        super().__init__()
        n = int(gib * 2**30 / 4 / parts / 4096)
        self.blocks = torch.nn.ParameterList(torch.nn.Parameter(torch.empty(n, 4096)) for _ in range(parts))
        self.head = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.head(x) + self.blocks[0][0, :16]


def build(gib=2.0):
    return Big(gib)
'''


def pinned_copy_gbps(nbytes: int, repeats: int = 5) -> float:
    host = torch.empty(nbytes // 4, dtype=torch.float32).pin_memory()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dev = host.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        del dev
    torch.cuda.empty_cache()
    return nbytes / min(times) / 1e9


def load_file_seconds(path: Path, repeats: int = 3) -> float:
    from safetensors.torch import load_file

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        state = load_file(str(path), device="cuda")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        del state
        torch.cuda.empty_cache()
    return statistics.median(times)


async def engine_loads(root: Path, model: dict, host_tier_gib: float, collect: bool = False,
                       repeats: int = 3) -> tuple[float, float, int]:
    """(median cold load s, median host-tier reload s, weight bytes) of ``model`` (a registration)
    on cuda:0; ``collect``: a full garbage collection before each timed load, so that what the
    previous round left is not counted in it."""
    from modelconsole.scheduler.config import GpuConfig
    from modelconsole.scheduler.engine import Engine

    engine = Engine(None, base_dir=str(root), gpu=GpuConfig(host_tier_gib=host_tier_gib))
    await engine.start()
    await engine.register({"warmup": 0, "device": "cuda:0", **model})
    inst = engine.instance(model["name"])
    cold, warm = [], []
    for _ in range(repeats):
        engine.host_tier.take(inst.key)  # drop it from the tier: a cold load reads the source
        if collect:
            gc.collect()
        t = time.perf_counter()
        await engine.load(inst.name)
        cold.append(time.perf_counter() - t)
        assert inst.load_source == model["source"], inst.load_source
        await engine.unload(inst.name)  # -> host tier
        if collect:
            gc.collect()
        t = time.perf_counter()
        await engine.load(inst.name)
        warm.append(time.perf_counter() - t)
        assert inst.load_source == "host tier", inst.load_source
        await engine.unload(inst.name)
    nbytes = inst.weight_bytes
    await engine.close()
    return statistics.median(cold), statistics.median(warm), nbytes


def make_hf_folder(folder: Path) -> None:
    """A BERT-base-sized BertForMaskedLM with random weights, written with save_pretrained."""
    import transformers

    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: seconds faster than on the CPU
        model = transformers.BertForMaskedLM(transformers.BertConfig())
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    for f in folder.iterdir():
        f.read_bytes()  # into the page cache for every reader


def from_pretrained_seconds(folder: Path, repeats: int = 3) -> float:
    import transformers

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model = transformers.BertForMaskedLM.from_pretrained(str(folder)).to("cuda").eval()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        del model
        torch.cuda.empty_cache()
    gc.collect()  # the reference's garbage (three models' worth) is not the engine's to collect later
    return statistics.median(times)


def hf_part(root_dir: str) -> tuple[float, float, float, int, float]:
    """The hf: figures, in a fresh process: (from_pretrained s, cold s, reload s, weight bytes,
    pinned copy GB/s of the same size)."""
    # as in a server whose registry has an hf: model when it starts: transformers is imported by
    # that registration, before the engine takes the heap out of the collector's walks
    # (engine._freeze_heap); imported later, its ~100k objects are walked by every full
    # collection, and one landing inside a 10 ms reload doubles it
    import transformers  # noqa: F401

    root = Path(root_dir)
    torch.cuda.init()
    make_hf_folder(root / "bert")
    hf_bytes = sum(f.stat().st_size for f in (root / "bert").glob("*.safetensors"))
    hf_copy = pinned_copy_gbps(hf_bytes)
    fp = from_pretrained_seconds(root / "bert")
    hf_cold, hf_warm, hf_weights = asyncio.run(engine_loads(root, {"name": "bert", "source": "hf:bert"}, 4,
                                                            collect=True))
    return fp, hf_cold, hf_warm, hf_weights, hf_copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=2.0, help="model size (default 2 GiB)")
    ap.add_argument("--no-hf", action="store_true", help="skip the hf: folder part (it needs transformers)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/reload.py needs a CUDA GPU")
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bigmodel.py").write_text(FACTORY)
        sys.path.insert(0, str(root))
        import bigmodel  # noqa: E402

        model = bigmodel.build(args.gib)
        for p in model.parameters():
            p.data.normal_()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "big.safetensors"))
        del model
        (root / "big.safetensors").read_bytes()  # into the page cache for both readers
        nbytes = (root / "big.safetensors").stat().st_size
        torch.cuda.init()
        copy_gbps = pinned_copy_gbps(nbytes)
        lf = load_file_seconds(root / "big.safetensors")
        big = {"name": "big", "source": "safetensors:big.safetensors", "factory": "bigmodel:build",
               "args": {"gib": args.gib},
               "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
               "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 16]}]}
        cold, warm, weight_bytes = asyncio.run(engine_loads(root, big, args.gib * 2 + 1))
        hf = None
        if not args.no_hf:
            # in a process of its own, as a server is: nothing left over from the 2 GiB runs above
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(1) as pool:
                hf = pool.apply(hf_part, (str(root),))
    reload_gbps = weight_bytes / warm / 1e9
    rows = [
        ("model weights", f"{weight_bytes / 2**30:.2f} GiB", ""),
        ("pinned host -> device copy", f"{copy_gbps:.1f} GB/s", "ceiling"),
        ("engine reload from host tier", f"{warm * 1000:.0f} ms = {reload_gbps:.1f} GB/s",
         f"{reload_gbps / copy_gbps:.2f} of the copy (target >= 0.70)"),
        ("safetensors load_file(device=cuda)", f"{lf * 1000:.0f} ms", "reference"),
        ("engine cold load (factory + file)", f"{cold * 1000:.0f} ms",
         f"{cold / lf:.2f}x load_file (target <= 1.2)"),
    ]
    out = {
        "host_tier_reload_gbps": round(reload_gbps, 2),
        "pinned_copy_gbps": round(copy_gbps, 2),
        "reload_vs_pinned": round(reload_gbps / copy_gbps, 3),
        "cold_load_s": round(cold, 3),
        "load_file_s": round(lf, 3),
        "cold_vs_load_file": round(cold / lf, 3),
    }
    if hf is not None:
        fp, hf_cold, hf_warm, hf_weights, hf_copy = hf
        hf_gbps = hf_weights / hf_warm / 1e9
        rows += [
            ("hf: BERT-base folder weights", f"{hf_weights / 2**20:.0f} MiB", "BertForMaskedLM, random"),
            ("transformers from_pretrained+.to(cuda)", f"{fp * 1000:.0f} ms", "reference"),
            ("engine cold load of hf:bert", f"{hf_cold * 1000:.0f} ms",
             f"{hf_cold / fp:.2f}x from_pretrained (target <= 1.0)"),
            ("engine reload of hf:bert from the tier", f"{hf_warm * 1000:.0f} ms = {hf_gbps:.1f} GB/s",
             f"{hf_gbps / hf_copy:.2f} of a pinned copy of {hf_copy:.1f} GB/s (target >= 0.8)"),
        ]
        out["hf_cold_vs_from_pretrained"] = round(hf_cold / fp, 3)
        out["hf_reload_vs_pinned"] = round(hf_gbps / hf_copy, 3)
    print(f"device: {torch.cuda.get_device_name(0)} | torch {torch.__version__}")
    for name, value, note in rows:
        print(f"{name:<38} {value:>26}  {note}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
