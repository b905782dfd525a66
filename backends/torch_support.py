"""What every backend running on PyTorch (torch, keras_torch) does the same way: the thread
count and TF32 settings, its devices, waiting for CUDA's queue, peak device memory, and
``torch.compile`` with dynamo's own counts as the witness that it compiled.

A mixin for ``BaseAdapter`` subclasses: put it first among the bases. Standard library only;
torch is imported by ``import_torch``, from the adapter's ``import_framework``.
"""

from __future__ import annotations

import collections
import logging
import platform
import re

from backends.base import CompiledStep
from backends.protocol import CompileCounts

#: what the torch witness reads
DYNAMO_COUNTS = ("torch._dynamo.utils.counters (stats.unique_graphs, frames.total, graph_break, "
                 "unimplemented, inductor.fxgraph_cache_hit), torch._dynamo.utils.guard_failures, "
                 "and dynamo's warning when it hits a recompile limit")


class TorchDevices:
    framework = "torch"

    def import_torch(self) -> dict:
        """Import torch; apply the thread count, the TF32 setting (torch's default allows TF32
        in cuDNN convolutions: off here unless ``tf32``) and cuDNN autotuning (torch's default,
        off, unless ``cudnn_benchmark``), and record them."""
        import torch

        self.torch = torch
        self._dynamo_limits = _DynamoLimits()
        logging.getLogger("torch._dynamo.convert_frame").addHandler(self._dynamo_limits)
        applied = self.settings["applied"]
        if self.settings.get("threads"):
            torch.set_num_threads(int(self.settings["threads"]))
        applied["torch.get_num_threads()"] = torch.get_num_threads()
        tf32 = bool(self.settings.get("tf32"))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        applied["torch allow_tf32 (matmul, cudnn)"] = tf32
        if self.settings.get("cudnn_benchmark"):  # cuDNN autotuning per shape (torch: off)
            torch.backends.cudnn.benchmark = True
        applied["torch.backends.cudnn.benchmark"] = torch.backends.cudnn.benchmark
        cudnn = torch.backends.cudnn.version() if torch.cuda.is_available() else None
        return {"torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": None if cudnn is None else str(cudnn)}

    def visible_gpus(self):
        torch = self.torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0, \
            f"torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA " \
            f"{torch.version.cuda})"

    def use_device(self, kind):
        if kind == "cuda":
            device = self.torch.device("cuda:0")
            return device, self.torch.cuda.get_device_name(device)
        return self.torch.device("cpu"), platform.processor() or "cpu"

    def block(self, value):
        """CPU ops run synchronously; CUDA ops queue until the device is synchronized."""
        if self.device_kind == "cuda":
            self.torch.cuda.synchronize(self.device)

    def reset_memory_peak(self):
        if self.device_kind == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def memory_peak(self):
        if self.device_kind == "cuda":
            return int(self.torch.cuda.max_memory_allocated(self.device))
        return None

    def torch_compile(self, target, **options):
        """``torch.compile(target, **options)`` after ``torch.compiler.reset()``, so that no
        compiler state of an earlier step carries over. Dynamo's caches and its recompile
        limit are per code object and process-wide: every ``nn.Sequential`` forward (and every
        Keras layer call) is one code object, so without the reset the ninth model compiled in
        a process runs eagerly, silently ("hit config.recompile_limit (8)", torch 2.13).
        ``reset`` is torch's own remedy ("as if you had started a fresh process"); inductor's
        on-disk caches stay (the witness counts their hits)."""
        self.torch.compiler.reset()
        return self.torch.compile(target, **options)

    def compiled_step(self, call) -> CompiledStep:
        """``call`` (a step that runs what ``torch_compile`` returned) with dynamo's own counts as
        its witness."""
        return CompiledStep(call, self.dynamo_counts, "torch.compile", DYNAMO_COUNTS)

    def dynamo_counts(self) -> CompileCounts:
        """Dynamo's process-wide counts (read around one step's calls, while nothing else
        compiles): graphs compiled (``stats.unique_graphs``), frames it converted
        (``frames.total``), recompilations (one ``guard_failures`` entry each), graph breaks
        (``graph_break``, and frames it skipped as untraceable, ``unimplemented``: both leave
        code to run eagerly between graphs), fallbacks (dynamo's warning that it hit a
        recompile limit: that function runs eagerly from then on), and FX graphs inductor
        loaded from its on-disk cache."""
        from torch._dynamo import utils

        counters, guard_failures = utils.counters, getattr(utils, "guard_failures", None)

        breaks: dict[str, int] = {}
        for table in (counters["graph_break"], counters["unimplemented"]):
            for message, n in table.items():
                key = _plain(message)
                if "recompile limit" not in key.lower():  # counted as a fallback
                    breaks[key] = breaks.get(key, 0) + n
        fallbacks = dict(self._dynamo_limits.reasons)
        return CompileCounts(
            compiled=counters["stats"]["unique_graphs"], traced=counters["frames"]["total"],
            recompiles=None if guard_failures is None else
            sum(len(v) for v in guard_failures.values()),
            graph_breaks=sum(breaks.values()), fallbacks=sum(fallbacks.values()),
            cache_hits=counters["inductor"]["fxgraph_cache_hit"], graph_break_reasons=breaks,
            fallback_reasons=fallbacks)


class _DynamoLimits(logging.Handler):
    """Dynamo's warning "torch._dynamo hit config.recompile_limit (8)", counted by the function
    it names (torch/_dynamo/convert_frame.py: the function runs eagerly from then on)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.reasons: collections.Counter = collections.Counter()

    def emit(self, record):
        if str(record.msg).startswith("torch._dynamo hit config.") and \
                isinstance(record.args, tuple) and len(record.args) >= 3:
            limit, value, function = record.args[:3]
            function = re.sub(r"\(\S*?site-packages/", "(", str(function))
            self.reasons[f"torch._dynamo hit config.{limit} ({value}) for {function}"] += 1


def _plain(message: str) -> str:
    """Dynamo's message in brief: its first line and the first sentence of its explanation
    ("Attempt to trace generator: Generators cannot be compiled directly ...")."""
    lines = str(message).strip().splitlines() or [""]
    explained = next((ln.strip().removeprefix("Explanation:").strip() for ln in lines[1:]
                      if ln.strip().startswith("Explanation:")), "")
    first = re.split(r"(?<=[^.]\.)\s", explained, maxsplit=1)[0].rstrip(".")
    return f"{lines[0].strip()}: {first}"[:300] if first else lines[0].strip()[:300]
