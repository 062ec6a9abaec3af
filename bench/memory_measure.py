"""Peak memory of real student-train steps on the CPU, two ways (used by memory_plan_bench.py).

    run_measurement({"config": {student-train settings}, "steps": 2})  # -> dict
    run_measurement(None)  # --calibrate

Each configuration runs in a fresh interpreter started by `run_measurement` with
MALLOC_MMAP_THRESHOLD_=65536: glibc then serves every allocation of 64 KiB or more with its own
mmap and gives it back to the kernel at free (setting the threshold also switches off glibc's
dynamic threshold, which would otherwise climb to 32 MiB after the first large free and keep
later tensors in the heap). The worker:

  1. imports torch, transformers, accelerate, peft, bitsandbytes and student-train, runs a
     small matmul and a backward (OpenMP threads and autograd engine started), resolves the
     config and opens the store (`check_inputs`, `check_run_dir`);
  2. gc + malloc_trim(0), baseline = VmRSS, resets the kernel's peak mark
     (`echo 5 > /proc/self/clear_refs`: VmHWM := VmRSS);
  3. `prepare_run` (student-train's own: accelerator, student with LoRA / checkpointing,
     store stream, objective, optimizer, scheduler); the load peak is read, the mark reset;
  4. `--steps` optimizer steps through student-train's `Step.train` on the run's own batches
     (`Run.batches.take(grad_accum)`), the peak mark reset before each step and read after.

Two measurements of each step, taken in the same process:
  rss     VmHWM - baseline: the process's resident memory (tensor bytes, plus what they cost
          the allocator, plus autograd graph nodes, Python objects and oneDNN / OpenMP scratch
          buffers). `--calibrate` checks it against known allocations: a filled tensor of
          N >= 10 MiB moves VmRSS by N within 0.05 % and comes back to the baseline when
          freed (VmHWM reads 170-300 KiB under the exact peak: the kernel batches its per-CPU
          RSS counters); 1 KiB tensors come from the heap with ~43 % overhead and stay there
          until malloc_trim. Peaks are thus precise to ~1 MiB plus the non-tensor memory of
          the step: on the bench's runs RSS peak - tensor peak = 61-91 MiB (autograd graph,
          Python objects, heap), more with bitsandbytes' CPU 8-bit step, whose fp32
          temporaries live inside one custom op and are invisible to `tensor`.
  tensor  the peak of live tensor bytes, what CUDA's max_memory_allocated reports (no caching
          allocator rounding): `LiveTensorBytes`, a TorchDispatchMode that sees every op's
          output storage and a weakref callback its death, seeded with the model's parameters
          and buffers and with each batch. Kernels' internal scratch buffers are not tensors
          and not counted. Live bytes are split by role at the peak: weights (parameters and
          buffers), gradients (re-labelled by a post-accumulate-grad hook on each trainable
          parameter), optimizer (allocated inside optimizer.step: states and step
          temporaries) and other (activations, KD-loss buffers, gradients of activations);
          the "other" bytes live at each output of the decoder stack (a forward hook: what
          the forward keeps for backward, before the lm_head and loss) are recorded too.

Static figures, exact: parameter / trainable / gradient / optimizer-state bytes (from the
tensors; gradients at the optimizer step). The worker prints one JSON line (the last line of
its stdout).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
ROLES = ("weights", "gradients", "optimizer", "other")


# ----------------------------------------------------------------------------- process memory

def rss_bytes() -> dict[str, int]:
    """{"rss": VmRSS, "hwm": VmHWM} of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out["rss" if key == "VmRSS" else "hwm"] = int(value.split()[0]) * 1024
    return out


def release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed small chunks back to the kernel
    except OSError:
        pass


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)


# ----------------------------------------------------------------------------- tensor bytes

def _make_tracker_class():
    """LiveTensorBytes is built on first use, so that importing this module needs no torch."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveTensorBytes(TorchDispatchMode):
        """Live tensor bytes by role, and their peak (module docstring, "tensor")."""

        def __init__(self):
            super().__init__()
            self.sizes: dict[int, tuple[int, str]] = {}  # StorageImpl address -> (bytes, role)
            self.refs: dict[int, weakref.ref] = {}
            self.current = dict.fromkeys(ROLES, 0)
            self.total = self.peak = 0
            self.peak_roles = dict(self.current)
            self.role_of_new = "other"

        def _gone(self, key: int, _ref=None) -> None:
            nbytes, role = self.sizes.pop(key, (0, "other"))
            self.refs.pop(key, None)
            self.current[role] -= nbytes
            self.total -= nbytes

        def track(self, tensor, role: str | None = None) -> None:
            storage = tensor.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            old = self.sizes.get(key)
            if old is None:
                # storages keep their Python object while the C++ storage lives, so the
                # callback runs when the memory is actually freed
                self.refs[key] = weakref.ref(storage, lambda _r, k=key: self._gone(k))
                old = (0, role or self.role_of_new)
            role = role or old[1]
            self.current[old[1]] -= old[0]
            self.current[role] += nbytes
            self.sizes[key] = (nbytes, role)
            self.total += nbytes - old[0]
            if self.total > self.peak:
                self.peak, self.peak_roles = self.total, dict(self.current)

        def track_all(self, values, role: str | None = None) -> None:
            for value in tree_flatten(values)[0]:
                if isinstance(value, torch.Tensor) and value.device.type != "meta":
                    self.track(value, role)

        def reset_peak(self) -> None:
            self.peak, self.peak_roles = self.total, dict(self.current)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.track_all(out)
            return out

    return LiveTensorBytes


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer) -> int:
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    return tensor_bytes(v for state in inner.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor))


# ----------------------------------------------------------------------------- the worker

def warm_up(student: str | None = None) -> None:
    """Start what a first step would start anyway (OpenMP threads, autograd engine) and import
    what loading the student imports lazily (its modeling code, peft, bitsandbytes, the
    stream, tensorboard: ~230 MB of code and tables), so the baseline holds them."""
    import importlib

    import torch

    x = torch.randn(256, 256, requires_grad=True)
    (x @ x).relu().sum().backward()
    for name in ("peft", "bitsandbytes", "torch.utils.tensorboard", "student_train.stream",
                 "student_train.train"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # optional extras: the run imports them itself if it needs them
    if student is not None:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):  # the architecture's module, no memory
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student))


def prepare(spec: dict):
    """(run, baseline bytes, load figures): student-train's own setup, measured."""
    from student_train.config import resolve_config
    from student_train.sources import check_inputs
    from student_train.train import check_run_dir, prepare_run

    cfg = resolve_config(None, spec["config"])
    inputs = check_inputs(cfg)
    out, _ = check_run_dir(cfg)
    release_memory()
    baseline = rss_bytes()["rss"]
    reset_peak()
    run = prepare_run(cfg, out, inputs)
    release_memory()
    mem = rss_bytes()
    return run, baseline, {"load_peak_rss": mem["hwm"] - baseline,
                           "after_load_rss": mem["rss"] - baseline}


def hook_roles(run, tracker) -> None:
    """Gradients and optimizer allocations get their role as they are made."""
    inner = getattr(run.optimizer, "optimizer", run.optimizer)

    def pre(*_):
        tracker.role_of_new = "optimizer"

    def post(*_):
        tracker.role_of_new = "other"

    inner.register_step_pre_hook(pre)
    inner.register_step_post_hook(post)
    for p in run.model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda q: tracker.track(q.grad, "gradients"))


def hook_decoder_output(run, tracker, seen: list[int]) -> None:
    """Appends to `seen`, at each output of the decoder stack (before the lm_head and loss),
    the live tensor bytes other than weights, gradients and optimizer state: what the forward
    keeps for backward, the batch included."""
    decoder = run.accelerator.unwrap_model(run.model).student.get_decoder()
    decoder.register_forward_hook(lambda *_: seen.append(tracker.current["other"]))


def measure(spec: dict) -> dict:
    import torch

    from student_train.losses import temperature_at

    warm_up(spec["config"].get("student"))
    run, baseline, result = prepare(spec)
    params = list(run.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    grads_at_step: list[int] = []
    inner = getattr(run.optimizer, "optimizer", run.optimizer)
    inner.register_step_pre_hook(lambda *_: grads_at_step.append(
        tensor_bytes(p.grad for p in trainable if p.grad is not None)))
    tracker = _make_tracker_class()()
    tracker.track_all(params + list(run.model.buffers()), "weights")
    hook_roles(run, tracker)
    at_decoder_output: list[int] = []
    hook_decoder_output(run, tracker, at_decoder_output)
    steps = []
    cfg = run.cfg
    for step in range(spec["steps"]):
        window = run.batches.take(cfg.grad_accum)
        if window is None:
            raise SystemExit(f"the store ran out of batches at step {step}: write more samples")
        release_memory()
        reset_peak()
        tracker.reset_peak()
        started = time.perf_counter()
        with tracker:
            tracker.track_all(window, "other")
            temperature = temperature_at(step, run.total_steps, cfg.temperature,
                                         cfg.temperature_end, cfg.temperature_schedule)
            stats = run.step.train(window, temperature, run.optimizer, run.scheduler)
        seconds = time.perf_counter() - started
        del window
        peak_rss = rss_bytes()["hwm"] - baseline
        release_memory()
        steps.append({"step": step + 1, "seconds": round(seconds, 2), "loss": stats["loss"],
                      "decoder_output_tensor": at_decoder_output[-1],
                      "peak_rss": peak_rss, "after_rss": rss_bytes()["rss"] - baseline,
                      "peak_tensor": tracker.peak, "peak_roles": dict(tracker.peak_roles),
                      "after_tensor": tracker.total})
    result.update({
        "spec": spec, "steps": steps, "torch_threads": torch.get_num_threads(),
        "param_bytes": tensor_bytes(params), "buffer_bytes": tensor_bytes(run.model.buffers()),
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in trainable),
        "gradient_bytes": max(grads_at_step), "optimizer_bytes": optimizer_state_bytes(
            run.optimizer), "optimizer_class": type(inner).__name__})
    return summarise(result)


def summarise(result: dict) -> dict:
    """Peaks over the measured steps, and the static / dynamic split of the tensor peak."""
    steps = result["steps"]
    top = max(steps, key=lambda s: s["peak_tensor"])
    static = result["param_bytes"] + result["buffer_bytes"] + result["gradient_bytes"] + \
        result["optimizer_bytes"]
    result.update({
        "peak_rss": max(s["peak_rss"] for s in steps),
        "peak_tensor": top["peak_tensor"], "peak_roles": top["peak_roles"],
        "decoder_output_tensor": top["decoder_output_tensor"],
        "static_bytes": static, "dynamic_tensor": top["peak_tensor"] - static,
        "state_rss": steps[-1]["after_rss"], "state_tensor": steps[-1]["after_tensor"]})
    return result


# ----------------------------------------------------------------------------- calibration

def calibrate() -> dict:
    """RSS and tracked bytes against known allocations (module docstring)."""
    import torch

    warm_up()
    tracker = _make_tracker_class()()
    rows = []
    for nbytes in (2**20, 10 * 2**20, 100 * 2**20, 400 * 2**20):  # the first warms up the mode
        release_memory()
        base = rss_bytes()["rss"]
        reset_peak()
        with tracker:
            t = torch.empty(nbytes // 4)
            t.fill_(1.0)
            held = rss_bytes()["rss"] - base
            tracked = tracker.total
            del t
        release_memory()
        after = rss_bytes()
        rows.append({"bytes": nbytes, "rss_held_ratio": held / nbytes,
                     "hwm_ratio": (after["hwm"] - base) / nbytes,
                     "rss_after_free": after["rss"] - base, "tracked_ratio": tracked / nbytes,
                     "tracked_after_free": tracker.total})
    del rows[0]
    release_memory()
    base = rss_bytes()["rss"]
    small = [torch.ones(256) for _ in range(50_000)]  # 1 KiB each: heap, not mmap
    small_ratio = (rss_bytes()["rss"] - base) / (50_000 * 1024)
    del small
    gc.collect()
    kept = rss_bytes()["rss"] - base
    release_memory()
    return {"large": rows, "small_1KiB_rss_ratio": small_ratio,
            "small_kept_after_free": kept, "small_kept_after_trim": rss_bytes()["rss"] - base}


# ----------------------------------------------------------------------------- parent side

def run_measurement(payload: dict | None, *, nice: int = 0, timeout: float = 3600) -> dict:
    """One worker in a fresh interpreter (payload None: `--calibrate`); its JSON result."""
    env = {**os.environ, **MALLOC_ENV, "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error"}
    args = ["--calibrate"] if payload is None else ["--spec", json.dumps(payload)]
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed (exit {proc.returncode}) for {payload}:\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", help="JSON: {config: student-train settings, steps: N}")
    p.add_argument("--calibrate", action="store_true")
    args = p.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]:
        raise SystemExit("run me through run_measurement (MALLOC_MMAP_THRESHOLD_=65536 unset)")
    result = calibrate() if args.calibrate else measure(json.loads(args.spec))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
