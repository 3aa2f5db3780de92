"""GPU mode (issue 10): vitflow's two GPU paths against the decode-bound ceiling, the
model-bound ceiling and a competent DataLoader loop, measured in one run on one GPU machine.

Photo-like JPEGs (default 16,000 at 800x600, as in the issue's figures), one model (default
``vit_base_patch16_224``, random weights, batch 256, bf16):

  decode ceiling   - every core decoding + resizing/cropping with PIL (the model's exact timm
                     eval transform) in a plain process pool, nothing else.
  model ceiling    - bf16 autocast forward on tensors already on the GPU (vitflow's
                     FeatureExtractor, default feature set), vectors copied back.
  DataLoader loop  - what a competent user writes: ``torch.utils.data.DataLoader`` with
                     cores-1 workers, pinned memory, prefetch 4, PIL + timm transform, bf16
                     forward; timed end to end, worker start-up included.
  decode-gpu actor work without Ray
                   - the files' bytes (read beforehand) through vitflow's decode_resize_batch
                     on the GPU and the forward, in this process: what one model actor can do
                     on decode gpu, the ceiling its end-to-end rate is set against.
  vitflow, decode cpu / gpu / gpu x2
                   - ``vitflow embed`` with compute.device cuda, precision bf16 and
                     compute.decode cpu (CPU decode actors) or gpu (nvJPEG in the model
                     actor; x2: two model actors sharing the GPU, half a GPU each), each end
                     to end in its own process (runs.run_vitflow: Python and Ray start-up
                     inside the timing), with its steady-state rate and the model actor's
                     start-up phases from the manifest.

GPU utilisation is sampled with nvidia-smi every 0.5 s during the DataLoader loop and each
vitflow run. Goals: decode cpu >= 0.9 x decode ceiling and >= 1.3 x the DataLoader loop;
decode gpu >= 0.6 x model ceiling. Prints one table, writes
WORKDIR/results/gpu.json; asserts nothing. Needs CUDA, and says so at once without it.

On a GPU machine without internet (../shared/device-kit/README.md), from the project root,
after unpacking .devkit into /tmp/site:

  PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 \\
      timeout 420 python3 benchmarks/gpu_throughput.py --photos-dir /tmp/vfb-photos

About 3-4 minutes on an H200 node with 16 cores (a third of it making the photos). Where no
GPU is at hand, ``--cpu-smoke`` runs every step on the CPU with a tiny model and 64 images
to check the script itself; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import usable_cores  # noqa: E402  (benchmarks/ is on sys.path)
from photos import describe_set, photo_set, set_paths  # noqa: E402
from report import Case, Row  # noqa: E402
from runs import decode_ceiling, forward_rate, run_vitflow  # noqa: E402

DECODE_GOAL, LOOP_GOAL, MODEL_GOAL = 0.9, 1.3, 0.6


class GpuSampler:
    """nvidia-smi's utilisation and memory every ``period`` seconds while the block runs."""

    def __init__(self, period: float = 0.5):
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        cmd = [
            "nvidia-smi",
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
            "--id=0",
        ]
        while not self._stop.is_set():
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
                util, mem = r.stdout.strip().splitlines()[0].split(",")[:2]
                self.samples.append((time.time(), float(util), float(mem)))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        util = np.array([u for _, u, _ in self.samples])
        if not len(util):
            return {"samples": 0}
        busy = np.flatnonzero(util > 0)
        working = util[busy[0] : busy[-1] + 1] if len(busy) else util[:0]
        return {
            "samples": int(len(util)),
            "util_mean": round(float(util.mean()), 1),
            "util_p50": float(np.median(util)),
            # From the first to the last sample with the GPU busy: start-up and shutdown left out.
            "util_mean_while_working": round(float(working.mean()), 1) if len(working) else None,
            "memory_used_max_mib": max(m for _, _, m in self.samples),
        }

    def note(self) -> str:
        s = self.summary()
        if not s["samples"]:
            return "GPU utilisation: no nvidia-smi samples"
        return (
            f"GPU utilisation mean {s['util_mean']}% (p50 {s['util_p50']:.0f}%, "
            f"{s['util_mean_while_working']}% from first to last busy sample), "
            f"memory up to {s['memory_used_max_mib']:.0f} MiB, {s['samples']} samples"
        )


class FolderDataset(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.open(self.paths[i]).convert("RGB"))


def dataloader_loop(paths, model_name, bs, workers, device, dtype) -> float:
    """Seconds for the DataLoader loop, worker start-up included."""
    import timm
    from timm.data import create_transform

    from vitflow.backbone import data_config
    from vitflow.config import FeatureConfig
    from vitflow.features import FeatureExtractor

    model = timm.create_model(model_name, pretrained=False, num_classes=0).eval()
    dcfg = data_config(model)
    ext = FeatureExtractor(model, [FeatureConfig()], dcfg["input_size"]).to(device)
    tf = create_transform(**dcfg, is_training=False)
    dl = torch.utils.data.DataLoader(
        FolderDataset([str(p) for p in paths], tf),
        batch_size=bs,
        num_workers=workers,
        pin_memory=device == "cuda",
        prefetch_factor=4 if workers else None,
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode(), torch.autocast(device, dtype=dtype):
        ext(torch.zeros(2, *dcfg["input_size"], device=device))  # kernels warmed, untimed
        sync()
        t0 = time.perf_counter()
        for x in dl:
            ext(x.to(device, non_blocking=True))["emb"].float().cpu()
        sync()
        return time.perf_counter() - t0


def actor_path_rates(paths, model_name, bs, device, batches) -> dict:
    """What one model actor can do on ``decode: gpu`` with Ray out of the picture: the files'
    bytes (read beforehand) through vitflow's own ``decode_resize_batch`` on ``device``,
    normalisation and the bf16 forward, vectors back on the host; and the decode part alone.
    The actor-side ceiling of the GPU-decode path, to set its end-to-end rate against."""
    import timm

    from vitflow.backbone import data_config
    from vitflow.config import FeatureConfig
    from vitflow.features import FeatureExtractor
    from vitflow.gpu_decode import decode_resize_batch
    from vitflow.preprocess import Preprocessor

    datas = [Path(p).read_bytes() for p in paths[: bs * (batches + 1)]]
    chunks = [datas[i : i + bs] for i in range(0, len(datas), bs)]
    warm, timed = chunks[0], chunks[1 : batches + 1]
    model = timm.create_model(model_name, pretrained=False, num_classes=0).eval()
    dcfg = data_config(model)
    pre = Preprocessor(dcfg)
    ext = FeatureExtractor(model, [FeatureConfig()], dcfg["input_size"]).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n = sum(len(c) for c in timed)
    out = {"images": n}
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
        got = decode_resize_batch(warm, pre, device)
        ext(pre.to_tensor(got.pixels, device))["emb"].float().cpu()
        out["device_decoded_share"] = sum(got.on_device) / len(got.on_device)
        sync()
        t0 = time.perf_counter()
        for c in timed:
            decode_resize_batch(c, pre, device)
        sync()
        out["decode_resize_img_s"] = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for c in timed:
            got = decode_resize_batch(c, pre, device)
            ext(pre.to_tensor(got.pixels, device))["emb"].float().cpu()
        sync()
        out["decode_forward_img_s"] = n / (time.perf_counter() - t0)
    return out


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit(
            "gpu_throughput.py needs CUDA, and torch sees no GPU here "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}): run it on "
            "a GPU machine (see the module docstring), or pass --cpu-smoke to check the script "
            "on the CPU"
        )
    try:
        import pydantic  # noqa: F401
        import ray  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"{e.name} is not importable: on a GPU machine without internet, unpack the "
            "device kit first (../shared/device-kit/README.md) and put it on PYTHONPATH, e.g. "
            "PYTHONPATH=/tmp/site:$PWD"
        ) from e
    if shutil.which("nvidia-smi") is None:
        print("note: nvidia-smi not found; GPU utilisation will not be sampled")


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--num-images", type=int, default=16000)
    ap.add_argument("--width", type=int, default=800)
    ap.add_argument("--height", type=int, default=600)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workdir", default="./bench-out", help="results, logs, manifests")
    ap.add_argument("--photos-dir", default=None, help="where the photos go; default: workdir")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="check the script where no GPU is at hand: every step on the CPU, "
        "vit_tiny_patch16_224, batch 16, 64 images; the figures mean nothing",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 2,048 images")
    ap.add_argument("--skip-dataloader", action="store_true", help="leave out the DataLoader loop")
    ap.add_argument(
        "--vitflow-timeout", type=float, default=600, help="seconds per vitflow run, then killed"
    )
    a = ap.parse_args()
    if a.quick:
        a.num_images = min(a.num_images, 2048)
    if a.cpu_smoke:
        a.num_images, a.batch_size = min(a.num_images, 64), min(a.batch_size, 16)
        a.model = "vit_tiny_patch16_224"
        device = "cpu"
    else:
        require_cuda()
        device = "cuda"
    work = Path(a.workdir).resolve()
    photos = Path(a.photos_dir).resolve() if a.photos_dir else work
    cores = usable_cores()
    t_start = time.perf_counter()

    import timm

    from vitflow.backbone import data_config

    dcfg = data_config(timm.create_model(a.model, pretrained=False, num_classes=0))
    root = photo_set(photos, a.num_images, a.width, a.height)
    paths = set_paths(root)
    n, bs = len(paths), a.batch_size
    case = Case(
        "gpu-cpu-smoke" if a.cpu_smoke else "gpu",
        "GPU mode: vitflow (decode on CPU / on GPU) vs decode ceiling, model ceiling, DataLoader",
        gpu_used=device == "cuda",
    )
    case.setup = [
        f"images   : {describe_set(paths, a.width, a.height)}",
        f"model    : {a.model}, random weights, batch {bs}, bf16 autocast, "
        "feature: last block, mean pool, L2",
    ]
    if a.cpu_smoke:
        case.setup.append("CPU SMOKE RUN: every step on the CPU; the figures mean nothing")

    # Each step's failure is kept as its own note and the rest still runs: on a borrowed GPU
    # machine a run is seldom repeated, and what was measured before a failure must survive.
    failures: list[str] = []
    results: dict = {}

    def step(name: str, fn):
        print(f"{name} ...", flush=True)
        try:
            results[name] = fn()
        except (Exception, SystemExit) as e:
            failures.append(f"{name} FAILED: {type(e).__name__}: {str(e)[-2000:]}")
            print(failures[-1], flush=True)
            results[name] = None
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
            partial = work / "results" / f"{case.key}-partial.json"
            partial.parent.mkdir(parents=True, exist_ok=True)
            done = {k: v.details() if hasattr(v, "details") else v for k, v in results.items()}
            partial.write_text(json.dumps({"failures": failures, **done}, default=str))
        return results[name]

    # Decode first: the process pool forks before CUDA is initialised in this process.
    sec_decode = step(
        f"decode ceiling ({cores} processes)", lambda: decode_ceiling(paths, dcfg, cores)
    )
    model_rate = step(
        "model ceiling",
        lambda: forward_rate(
            a.model,
            batch_size=bs,
            batches=3 if a.cpu_smoke else 30,
            device=device,
            precision="bf16",
        ),
    )
    actor = step(
        "decode-gpu actor work without Ray",
        lambda: actor_path_rates(paths, a.model, bs, device, 2 if a.cpu_smoke else 12),
    )
    workers = max(0, cores - 1)
    with GpuSampler() as loop_gpu:
        sec_loop = (
            None
            if a.skip_dataloader
            else step(
                f"DataLoader loop ({workers} workers)",
                lambda: dataloader_loop(paths, a.model, bs, workers, device, torch.bfloat16),
            )
        )

    runs, samplers = {}, {}
    # decode gpu x2: two model actors share the GPU (half a GPU each), so one decodes its
    # batch (nvJPEG's Huffman stage runs on the actor's CPU thread) while the other's
    # forward runs; the issue asks for several actors per GPU only where measured to help.
    variants = {"gpu": ("gpu", None), "gpu x2": ("gpu", 0.5), "cpu": ("cpu", None)}
    for key, (decode, per_gpu) in variants.items():
        job = {
            "kind": "embed",
            "source": {"uri": str(root)},
            "model": {"name": a.model, "weights": "random"},
            "compute": {
                "device": device,
                "precision": "bf16",
                "batch_size": bs,
                "decode": decode,
                **({"num_gpus_per_actor": per_gpu} if per_gpu and device == "cuda" else {}),
            },
        }
        with GpuSampler() as samplers[key]:
            run = step(
                f"vitflow decode {key}",
                lambda job=job, key=key: run_vitflow(
                    job,
                    work=work / "gpu",
                    name=f"decode-{key.replace(' ', '')}",
                    keep_output=False,
                    timeout_s=a.vitflow_timeout,
                ),
            )
        if run is not None:
            run.extra["gpu"] = samplers[key].summary()
            runs[key] = run

    def rate(seconds):
        return n / seconds if seconds else None

    decode_rate, loop_rate = rate(sec_decode), rate(sec_loop)
    case.rows = [
        Row(f"decode ceiling ({cores} processes, PIL + timm eval resize/crop)", n, sec_decode),
        Row(
            f"model ceiling (bf16 forward, tensors on {device}, batch {bs})", None, None, model_rate
        ),
    ]
    if actor:
        case.rows += [
            Row(
                "decode-gpu actor work, no Ray: decode_resize_batch only",
                None,
                None,
                actor["decode_resize_img_s"],
                note=f"{100 * actor['device_decoded_share']:.0f}% of a batch decoded on {device}",
            ),
            Row(
                "decode-gpu actor work, no Ray: decode + resize + forward",
                None,
                None,
                actor["decode_forward_img_s"],
            ),
        ]
    case.rows.append(
        Row(
            f"DataLoader loop ({workers} workers, "
            f"{'pinned memory, ' if device == 'cuda' else ''}bf16)",
            n,
            sec_loop,
            note=loop_gpu.note(),
        )
    )
    for decode, run in runs.items():
        case.rows.append(
            Row(
                f"vitflow decode {decode}: end to end (CLI process, Ray start-up incl.)",
                run.listed,
                run.seconds,
                note=samplers[decode].note(),
            )
        )
        case.rows.append(
            Row(f"vitflow decode {decode}: steady state (manifest)", None, None, run.steady)
        )
    if "cpu" in runs:
        cpu = runs["cpu"]
        for label, r in (("end to end", cpu.listed / cpu.seconds), ("steady state", cpu.steady)):
            case.ratio(f"vitflow decode cpu / decode ceiling, {label}", r, decode_rate, DECODE_GOAL)
            case.ratio(f"vitflow decode cpu / DataLoader loop, {label}", r, loop_rate, LOOP_GOAL)
        case.ratio(
            "vitflow decode cpu: its decode stage / decode ceiling", cpu.decode_rate, decode_rate
        )
    for key in ("gpu", "gpu x2"):
        if key not in runs:
            continue
        gpu = runs[key]
        for label, r in (("end to end", gpu.listed / gpu.seconds), ("steady state", gpu.steady)):
            case.ratio(f"vitflow decode {key} / model ceiling, {label}", r, model_rate, MODEL_GOAL)
        if actor:
            case.ratio(
                f"vitflow decode {key} steady / one actor's work without Ray",
                gpu.steady,
                actor["decode_forward_img_s"],
            )
    case.notes = [f"decode {k}: {r.breakdown()}" for k, r in runs.items()] + failures
    case.notes.append(
        f"whole benchmark: {time.perf_counter() - t_start:.0f} s; python {sys.version.split()[0]}"
    )
    case.details = {
        "decode_ceiling_seconds": sec_decode,
        "model_ceiling_img_s": model_rate,
        "actor_work_without_ray": actor,
        "dataloader_seconds": sec_loop,
        "dataloader_gpu": loop_gpu.summary(),
        "failures": failures,
        **{f"vitflow_decode_{k.replace(' ', '')}": r.details() for k, r in runs.items()},
    }
    case.print()
    case.save(work, a.quick)


if __name__ == "__main__":
    main()
