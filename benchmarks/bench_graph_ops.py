"""Why the scoring graph is built the way it is: onnxruntime timings of the alternatives,
measured side by side in one run, at batch 1 and batch 256, one intra-op thread.

The catalog has the shape of Complete Journey with 64 factors (92,334 items); the values are
random (these ops do the same work whatever the values). Each line compares what
``training/export.py`` uses with the alternative it replaced:

1. exclusion: ``Where(exclude, -inf, scores)`` vs ``scores - Cast(exclude) * 3e38``;
2. scoring: ``MatMul(q, items.T)`` vs ``Gemm(q, items, transB=1)``;
3. the head's part of ``exclude`` (23,083 columns): ``Gather`` of column positions vs a
   ``Slice`` of the first columns (why the artifact puts the head first).

Usage: ``python benchmarks/bench_graph_ops.py``; prints JSON (median microseconds and the
ratio alternative / ours, > 1: ours faster).
"""

from __future__ import annotations

import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

N_ITEMS, N_FACTORS, HEAD = 92_334, 64, 23_083


def session(nodes: list, inputs: list, output: str, inits: list) -> ort.InferenceSession:
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def median_us(s: ort.InferenceSession, feeds: dict, reps: int) -> float:
    s.run(None, feeds)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        s.run(None, feeds)
        times.append(time.perf_counter() - t)
    return round(float(np.median(times)) * 1e6, 1)


def main() -> int:
    rng = np.random.default_rng(0)
    items = rng.standard_normal((N_ITEMS, N_FACTORS)).astype(np.float32)
    mask_in = helper.make_tensor_value_info("m", TensorProto.BOOL, ["b", N_ITEMS])
    scores_in = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["b", N_ITEMS])
    q_in = helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", N_FACTORS])
    ninf = numpy_helper.from_array(np.array(-np.inf, np.float32), "ninf")
    big = numpy_helper.from_array(np.array(3e38, np.float32), "big")
    cols = numpy_helper.from_array(
        np.sort(rng.permutation(N_ITEMS)[:HEAD]).astype(np.int64), "cols"
    )
    bounds = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in
              (("start", 0), ("end", HEAD), ("axis", 1))]  # fmt: skip
    as_float = [helper.make_node("Cast", ["g"], ["o"], to=TensorProto.FLOAT)]
    pairs = {
        "exclusion": (
            session([helper.make_node("Where", ["m", "ninf", "s"], ["o"])], [mask_in, scores_in], "o", [ninf]),
            session([helper.make_node("Cast", ["m"], ["f"], to=TensorProto.FLOAT),
                     helper.make_node("Mul", ["f", "big"], ["p"]),
                     helper.make_node("Sub", ["s", "p"], ["o"])], [mask_in, scores_in], "o", [big]),
        ),
        "scoring": (
            session([helper.make_node("MatMul", ["q", "it"], ["o"])], [q_in], "o",
                    [numpy_helper.from_array(np.ascontiguousarray(items.T), "it")]),
            session([helper.make_node("Gemm", ["q", "i"], ["o"], transB=1)], [q_in], "o",
                    [numpy_helper.from_array(items, "i")]),
        ),
        "head_of_exclude": (
            session([helper.make_node("Gather", ["m", "cols"], ["g"], axis=1), *as_float], [mask_in], "o", [cols]),
            session([helper.make_node("Slice", ["m", "start", "end", "axis"], ["g"]), *as_float], [mask_in], "o", bounds),
        ),
    }  # fmt: skip
    results: dict = {"n_items": N_ITEMS, "n_factors": N_FACTORS, "head": HEAD}
    for batch, reps in ((1, 300), (256, 10)):
        feeds_all = {
            "m": rng.random((batch, N_ITEMS)) < 0.3,
            "s": rng.random((batch, N_ITEMS), dtype=np.float32),
            "q": rng.standard_normal((batch, N_FACTORS)).astype(np.float32),
        }
        for name, (theirs, ours) in pairs.items():
            needed = {i.name for i in ours.get_inputs()}
            feeds = {k: v for k, v in feeds_all.items() if k in needed}
            alternative, used = median_us(theirs, feeds, reps), median_us(ours, feeds, reps)
            results[f"{name}_batch_{batch}"] = {
                "alternative_us": alternative,
                "ours_us": used,
                "ratio_alternative_over_ours": round(alternative / used, 2),
            }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
