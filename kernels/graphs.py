"""--cuda-graph: a whole training step captured as one CUDA graph and replayed.

A small GAN on a big GPU spends its time launching hundreds of kernels per step, not running them;
a replayed graph is one launch. The scripts' shared plumbing uses this when the repository's
`kernels` package is at hand (a script pasted alone into a notebook trains eagerly: the same math).

    graphs = CudaGraphs(run, warn, fail)      # run: the script's Run (its optimizers, its batches)
    stats = graphs(step, args)                # step(*args) as the loop calls it
"""
import warnings
from contextlib import nullcontext

import torch


def _said(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:200]


class CudaGraphs:
    """step() captured as one CUDA graph after WARMUP eager steps (on a side stream, as PyTorch's
    whole-network capture does), then replayed. The same Python code, run once more under capture;
    one graph per key (wgan.py: per number of critic updates). The optimizers step on the device
    (capturable). A step that cannot be captured trains eagerly from then on, said in one line
    (warn) that names the real cause; if even the eager step fails then, one line (fail) stops."""
    WARMUP = 3

    def __init__(self, run, warn, fail):
        self.run, self.warn, self.fail = run, warn, fail
        self.graphs, self.seen, self.stream = {}, {}, torch.cuda.Stream()
        for opt in (run.nets["opt_G"], run.nets["opt_D"]):
            for group in opt.param_groups:
                group["capturable"] = True
            for state in opt.state.values():                # (a checkpoint's eager optimizer)
                state["step"] = state["step"].to(run.device)

    def __call__(self, step, args):
        run = self.run
        if args in self.graphs:                             # replayed: the batches it drew, again
            graph, stats, run.batches = self.graphs[args]
            graph.replay()
            return stats
        self.seen[args] = self.seen.get(args, 0) + 1
        graph, failed = torch.cuda.CUDAGraph() if self.seen[args] > self.WARMUP else None, None
        self.stream.wait_stream(torch.cuda.current_stream())  # warm-up and capture: one stream
        with torch.cuda.stream(self.stream), warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*capturable=True")  # (the eager warm-up steps)
            try:
                with torch.cuda.graph(graph, stream=self.stream) if graph else nullcontext():
                    stats = step(*args)                     # (a capture records, runs nothing)
            except Exception as e:
                if not graph:
                    raise
                failed = e.__context__ or e                 # the capture's end says "a previous
            if failed:                                      # error": its cause is the reason
                self.warn(f"--cuda-graph: this step cannot be captured ({_said(failed)}); "
                          f"eager steps")
                run.graphs, graph, run.batches = None, None, 0  # out of the capture, dropped
                try:
                    stats = step(*args)
                except Exception as e:                      # (older torch: the RNG still captures)
                    self.fail(f"--cuda-graph: the step failed captured ({_said(failed)}) and "
                              f"eagerly ({_said(e)}); run without --cuda-graph")
        torch.cuda.current_stream().wait_stream(self.stream)
        if graph:
            self.graphs[args] = graph, stats, run.batches
            graph.replay()
        return stats
