"""What every backend running on PyTorch (torch, keras_torch) does the same way: the thread
count and TF32 settings, its devices, waiting for CUDA's queue, peak device memory, and
``torch.compile`` with dynamo's own counts as the witness that it compiled.

A mixin for ``BaseAdapter`` subclasses: put it first among the bases. Standard library only;
torch is imported by ``import_torch``, from the adapter's ``import_framework``.
"""

from __future__ import annotations

import platform
import re

from backends.base import CompiledStep
from backends.protocol import CompileCounts

#: what the torch witness reads
DYNAMO_COUNTS = ("torch._dynamo.utils.counters (frames, stats.unique_graphs, graph_break, "
                 "unimplemented, inductor.fxgraph_cache_hit) and guard_failures")


class TorchDevices:
    framework = "torch"

    def import_torch(self) -> dict:
        """Import torch; apply the thread count and TF32 setting (torch's default allows TF32
        in cuDNN convolutions: off here unless ``tf32``), and record them."""
        import torch

        self.torch = torch
        applied = self.settings["applied"]
        if self.settings.get("threads"):
            torch.set_num_threads(int(self.settings["threads"]))
        applied["torch.get_num_threads()"] = torch.get_num_threads()
        tf32 = bool(self.settings.get("tf32"))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        applied["torch allow_tf32 (matmul, cudnn)"] = tf32
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
        """``torch.compile(target, **options)``."""
        return self.torch.compile(target, **options)

    def compiled_step(self, call) -> CompiledStep:
        """``call`` (a step that runs what ``torch_compile`` returned) with dynamo's own counts as
        its witness."""
        return CompiledStep(call, self.dynamo_counts, "torch.compile", DYNAMO_COUNTS)

    def dynamo_counts(self) -> CompileCounts:
        """Dynamo's process-wide counters (read around one step's calls, while nothing else
        compiles): graphs compiled (``stats.unique_graphs``), frames it converted
        (``frames.total``), recompilations (one ``guard_failures`` entry each), graph breaks
        (``graph_break``, and the frames it skipped as untraceable, ``unimplemented``: both
        leave code to run eagerly between graphs), fallbacks (``unimplemented`` because a
        recompile limit was reached: that code runs eagerly from then on), and FX graphs
        inductor loaded from its on-disk cache."""
        from torch._dynamo.utils import counters, guard_failures

        reasons: dict[str, int] = {}
        breaks = fallbacks = 0
        for table in (counters["graph_break"], counters["unimplemented"]):
            for message, n in table.items():
                key = _plain(message)
                reasons[key] = reasons.get(key, 0) + n
                if table is counters["unimplemented"] and "recompile limit" in key.lower():
                    fallbacks += n
                else:
                    breaks += n
        return CompileCounts(
            compiled=counters["stats"]["unique_graphs"], traced=counters["frames"]["total"],
            recompiles=sum(len(v) for v in guard_failures.values()), graph_breaks=breaks,
            fallbacks=fallbacks, cache_hits=counters["inductor"]["fxgraph_cache_hit"],
            reasons=reasons)


def _plain(message: str) -> str:
    """Dynamo's message in brief: its first line and the first sentence of its explanation
    ("Dynamo recompile limit exceeded: ... (currently set to 8)")."""
    lines = str(message).strip().splitlines() or [""]
    explained = next((ln.strip().removeprefix("Explanation:").strip() for ln in lines[1:]
                      if ln.strip().startswith("Explanation:")), "")
    first = re.split(r"(?<=[^.]\.)\s", explained, maxsplit=1)[0].rstrip(".")
    return f"{lines[0].strip()}: {first}"[:300] if first else lines[0].strip()[:300]
