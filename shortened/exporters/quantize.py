"""Weight-only int4/int8 quantization of an exported graph with onnxruntime's own quantizer.

`export_onnx(precision="int4" | "int8")` traces the fp32 graph (fused or portable), checks it as usual, then hands it
to `onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`: every MatMul with a constant weight
(attention projections, MLP, and the output head unless `head=False`) becomes a MatMulNBits node holding blocked
int4/int8 weights with one scale (and, asymmetric, one zero point) per `block_size` weights along K. Activations,
norms, attention and the KV cache stay fp32.

Methods (all onnxruntime's): rtn (its C++ round-to-nearest, `DefaultWeightOnlyQuantConfig`; the one
onnxruntime-genai's builder uses), hqq (half-quadratic, asymmetric, 4 bits; its float
zero points are rewritten to uint8 ones plus an exact per-block offset, for MatMulNBits' fast CPU kernel), gptq (Hessian
from calibration activations, 4 bits; the calibration windows run through the fp32 graph). MatMulNBits nodes that
share an input (gate and up) are packed into one node + Split after the quantizer, exactly.

The embedding: with tied embeddings (SmolLM2) and an rtn-quantized head, the Gather reads the head's own quantized
table through GatherBlockQuantized (as genai's builder does), so the vocabulary table is stored once, in int4/int8.
Untied, an int4 rtn export quantizes the table with the quantizer's own Gather support; otherwise it stays fp32.

format="qdq" writes the same blocked int4 weights as DequantizeLinear(block_size) -> MatMul instead (standard ONNX,
opset 21: what TensorRT 10.x reads); rtn only, 4 bits only, embedding kept fp32.

Defaults (block 32, symmetric, accuracy level 4, head quantized): measured on SmolLM2-135M pruned to 24 blocks, CPU,
2 threads (see DEFAULTS_MEASURED).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from shortened.data import CalibSpec, load_calibration
from shortened.errors import UsageError
from shortened.exporters.layout import DATA_FILE, ONNX_FILE, RECORD_FILE, cache_geometry, kv_names, save_graph
from shortened.io import atomic_dir, check_output_dir, write_json
from shortened.model.families import geometry
from shortened.options import check, option

log = logging.getLogger(__name__)

BITS = {"int4": 4, "int8": 8}
QUANTIZED = tuple(BITS)  # weight-only: an fp32 graph whose MatMul weights are int4/int8
METHODS = ("rtn", "hqq", "gptq")
FORMATS = ("qoperator", "qdq")
BLOCK_SIZES = (16, 32, 64, 128, 256)
# Measured on SmolLM2-135M-Instruct pruned to 24 blocks (blocks 12-15, 17, 26 removed), fused graph, CPU: KL of the
# next-token distributions against fp32 PyTorch and perplexity on WikiText-2 test windows of 128 tokens (4 windows,
# fp32 PPL 94.37; then 8 windows, fp32 PPL 122.29), file size:
#   int4 rtn sym block 32, head int4 (genai's default)   73 MB  mean KL 0.566  top-1 0.564  PPL 135.0 (4 windows)
#     same, accuracy level 0 (fp32 activations)           73 MB  mean KL 0.564               PPL 133.7
#     same, asymmetric                                    75 MB  mean KL 0.562               PPL 151.6
#     same, block 16                                      88 MB  mean KL 0.445               PPL 127.5
#     same, head int8                                     88 MB  mean KL 0.448               PPL 119.3
#   int4 hqq block 32, head + tied embedding fp32        201 MB  mean KL 0.095  top-1 0.797  PPL 104.9
#   int4 hqq block 32, head int4 rtn (shared)             84 MB  mean KL 0.130  top-1 0.706  PPL 137.8 (8 windows)
#   int4 hqq block 32, head int8 rtn (shared)             98 MB  mean KL 0.0016 top-1 0.976  PPL 122.0 (8 windows)
#   int8 rtn sym block 32                                130 MB  mean KL 0.0070 top-1 0.936  PPL 94.79 (4 windows)
# RTN rounds SmolLM2's outlier-heavy projections badly; the int4 head costs most of the rest. So int4 defaults to
# hqq for the blocks and an int8 head shared with the embedding; int8 to rtn (hqq and gptq are 4-bit only).
# WikiText-2 through onnxruntime, 60 x 128 windows: fp32 144.35, int4 (hqq, float zero points) 144.24, int8 145.32,
# onnxruntime-genai's int4 builder 238.92.
# Speed: HQQ's float zero points miss MatMulNBits' fast CPU path in onnxruntime 1.32 (a decode step 180 ms). So
# hqq's zero points are written as uint8, exactly (_integer_zero_points: round(z) in the node, the fractional rest
# as a per-block offset matmul on the block sums of x). One decode step, batch 1, 64-token prompt, 2 threads,
# median of 7 repetitions side by side in one process (load 4.5), against rtn int4 with an int4 head (genai's layout):
#   layout (int4 blocks, block 32 unless named)          size    decode ms (ratio)   8 windows: PPL  mean KL  top-1
#   rtn sym, head int4 (genai's layout, the reference)     73 MB  10.7-11.7 (1.00)       182.73   0.600   0.520
#   rtn sym, head int8                                     87 MB  11.5-12.2 (0.94-0.96)  162.17   0.474   0.592
#   rtn asym (uint8 zero points), head int8                90 MB  11.9 (0.90)            171.92   0.456   0.605
#   rtn sym block 16, head int8                           102 MB  15.2 (0.70)            162.31   0.384   0.635
#   hqq, zeros rounded + scales refit (not kept)           89 MB  12.4 (0.86)            172.30   0.474   0.592
#   hqq, float zero points, head int8 (old default)        98 MB  181.6 (0.06)           122.00   0.0016  0.976
#   hqq, uint8 zeros + exact offset, head int8 (default)  100 MB  14.2 (0.82)            123.00   0.0060  0.956
#   fp32                                                  438 MB  37.6 (0.29)           122.29
# (KL/top-1 here against the fp32 onnx export; the default's KL over the float layout is accuracy level 4's int8
# activations, which only the fast path applies.) 60 windows: fp32 144.37, this default 144.82 (+0.3%).
# Rounding hqq's zeros alone loses everything: this checkpoint's
# weights lie on a 4-bit grid with fractional offsets (11 distinct values in a block of 32), which hqq's float zero
# finds and an integer zero cannot. The default is 13x faster than the old one at +0.6% PPL but still 0.82x genai's
# int4 step (the offset matmuls); gptq and accuracy levels were not measured in this round.
# Caveat: this SmolLM2 is dequantized from a Q4_1 GGUF: its block weights hold ~13 distinct values per block of 32
# (a 4-bit grid with a per-block offset), which hqq at block 32 nearly recovers; the int4 figures above flatter int4.
# Issue 13 round (onnxruntime 1.32, onnxruntime-genai 0.18; 2 threads; ratios side by side in one process, median
# [min-max] of 5-10 interleaved repetitions of a 32-token decode after a 128-token prompt, in genai's runtime):
#   where the time goes (enable_profiling, 30 decode steps, kernel us/step): genai's int4 4184 = MatMulNBits 2776
#   (121 nodes: packed qkv, o, gate, up, down, head) + GQA 803 + SkipSimplifiedLN 312 + the rest; ours (gate/up
#   packed) 6418 = MatMulNBits 2960 (97 nodes, with the int8 head: twice the int4 head's bytes) + the offset chains
#   MatMul 764 + Add 426 + ReduceSum 401 + Reshape 376 (96 each) + Split 115: the chains are dispatch, not bandwidth
#   (~7 us each; their fp32 offsets are 10 MB a step against 42 MB of int4 weights). Both graphs pack q/k/v into one
#   MatMulNBits (onnxscript's fusion does it for us); genai keeps gate and up apart; every MatMulNBits of both runs
#   accuracy level 4; the session options (threads, spinning) are the same.
#   variant (load 0.2-0.6 unless named)                    ms/step  vs genai int4       WikiText-2 60 windows
#   genai int4 (rtn sym, int4 head)                          2.92     1.00                238.92 (fp32 144.35)
#   before this round (7 chains a block, int8 head)          4.35     0.68 [0.66-0.69]    144.81
#   same with no offset chains at all (wrong numerics)       3.43     0.86 [0.83-0.87]    - (the bound on chains)
#   same with an int4 rtn head (shared embedding)            3.84     0.77 [0.74-0.83]    +13% (8 windows, above)
#   gate/up packed into one MatMulNBits + Split (kept)       4.39     0.71 [0.65-0.75] (base 0.68 in the same run)
#   + offset matmuls as int8 MatMulNBits (not kept)          4.35     0.68 [0.66-0.71] (pack 0.70): no gain
#   + block sums as extra columns of the node (not kept)              0.98 [0.81-1.22] of pack (load 3.8): no gain
#   + hqq int4 head with its own offset (not kept)                    0.71 vs pack 0.69 (load 3.9): no clear gain
#   + o_proj zeros rounded, no chain (not kept, below)       12.85*  0.73 [0.66-0.85] (pack 0.67; *load 3.4)
#   rounding one projection's zeros, WikiText-2 60 windows: o_proj 144.88 (+0.05% over exact), qkv 164.01, gate/up
#   159.86, down 161.74; PTB 40 windows: fp32 301.0, exact 302.53, o_proj rounded 303.09. But parity against the
#   PyTorch checkpoint (L128, batch 1) gives o_proj rounded mean KL 0.025 / 0.059 (text / random: FAILS the 0.05
#   gate) against 0.005 / 0.008 exact; greedy on 4 WikiText prompts (128 + 32 tokens), tokens before the first
#   difference from fp32: exact 32/18/32/32, o_proj rounded 10/18/32/32, genai int4 0/0/0/0. So it was not kept.
#   bench_quantized.py with the default (gate/up packed, exact offsets), 2 threads, 14 interleaved repetitions, load
#   1.2 before / 4.1 after (another engineer's jobs on the 2 cores): ours int4 8.03 ms/step, genai int4 6.16:
#   0.757 [0.692-0.777] x genai; 13.7 [9.6-29.2] x PyTorch fp32 eager on the original; PPL 60 windows int4 144.81
#   vs fp32 144.35 (1.003x; int8 145.32, genai int4 238.92); 99.5 MB (genai 73.2 MB). A second run (--skip-ppl,
#   9 repetitions, load 5.3 / 4.1): 12.20 vs 8.82 ms, 0.702 [0.636-0.855] x genai, 14.8 [13.6-38.9] x eager.
#   (With o_proj rounded, load 4.0-4.2, 7 repetitions: 0.786 [0.763-0.823] x genai, 29.8 [26.5-39.0] x eager,
#   PPL 144.88, 98.5 MB.)
#   The 1.0x goal is not reached: the exact offsets that keep PPL within 0.3% cost ~3 nodes per projection, and the
#   int8 head (the int4 one costs 13% PPL) ~0.5 ms; genai's layout is that fast only because it drops both (+65% PPL).
DEFAULT_METHOD = {4: "hqq", 8: "rtn"}
DEFAULT_HEAD_BITS = {4: 8, 8: 8}


@dataclass
class QuantOptions:
    """How the MatMul weights are quantized (every field recorded in export.json, resolved)."""

    method: str = option("", "rtn (round to nearest), hqq, or gptq calibrated on --calib (default: int4 hqq, "
                         "int8 rtn)", choices=METHODS, flag="--quant-method")  # fmt: skip
    block_size: int = option(32, "weights per scale along K (16..256, a power of 2)")
    symmetric: bool = option(True, "no zero points; --asymmetric: zero points per block (rtn; hqq is "
                             "always asymmetric)", flag="--asymmetric")  # fmt: skip
    accuracy_level: int = option(4, "MatMulNBits compute: 4 int8 activations, 1 fp32, 0 unset (2 fp16, 3 bf16)")
    head: bool = option(
        True, "quantize the output head too; --no-quantize-head: keep it fp32", flag="--no-quantize-head"
    )
    head_bits: int = option(-1, "bits of the output head (and a tied embedding): 4, 8, 0: as --precision; -1: the "
                            "precision's measured default (8)", choices=(0, 4, 8))  # fmt: skip
    embedding: bool = option(True, "tied: gather from the head's quantized table; untied int4 rtn: quantize the "
                             "table", cli=False)  # fmt: skip
    format: str = option("qoperator", "qdq: DequantizeLinear -> MatMul (standard ONNX, for TensorRT; int4 rtn, no "
                         "--optimize)", choices=FORMATS, flag="--quant-format")  # fmt: skip
    pack: bool = option(True, "merge the MatMulNBits that share an input (gate/up) into one node + Split", cli=False)
    float_zero_points: bool = option(False, "hqq: keep its float zero points (slow CPU path) instead of rounding to "
                                     "uint8", cli=False)  # fmt: skip

    def resolved(self, bits: int) -> QuantOptions:
        """A copy with the precision's defaults filled in (what export.json records)."""
        import dataclasses

        qdq = self.format == "qdq"  # rtn and 4 bits throughout: what the quantizer writes as QDQ
        return dataclasses.replace(
            self,
            method=self.method or ("rtn" if qdq else DEFAULT_METHOD[bits]),
            head_bits=(0 if qdq else DEFAULT_HEAD_BITS[bits]) if self.head_bits == -1 else self.head_bits,
        )

    def validate(self, bits: int) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.format not in FORMATS:
            raise UsageError(f"unknown quantization format {self.format!r}; choose qoperator or qdq")
        if self.block_size not in BLOCK_SIZES:
            raise UsageError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        if self.head_bits not in (-1, 0, 4, 8):
            raise UsageError(f"head bits must be 0 (as the weights), 4 or 8; got {self.head_bits}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UsageError(f"accuracy level must be 0..4, got {self.accuracy_level}")
        if self.method in ("hqq", "gptq") and bits != 4:
            raise UsageError(f"{self.method} quantizes to 4 bits only in onnxruntime; use --precision int4 or rtn")
        if self.format == "qdq" and (bits != 4 or self.method != "rtn"):
            raise UsageError("the QDQ format is written for int4 rtn only (onnxruntime's quantizer); use the default")
        check(self, "quantization option")  # the types (Python and TOML callers)


def _head_node(graph, inits: dict, vocab: int):
    """The MatMul producing the logits: the last one whose constant weight has vocab columns."""
    found = None
    for n in graph.node:
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits:
            dims = list(inits[n.input[1]].dims)
            if len(dims) == 2 and dims[1] == vocab:
                found = n
    return found


def _embedding_node(graph, inits: dict):
    return next((n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                 and n.input[1] == "input_ids"), None)  # fmt: skip


def _unfuse_head(graph, inits: dict) -> int:
    """onnxscript fuses a tied head (x @ embedding^T) into FusedMatMul(transB=1), which the quantizer skips: turn each
    such node with a constant weight back into a MatMul on a transposed copy of the weight. Returns how many."""
    from onnx import helper, numpy_helper

    count = 0
    for i, n in enumerate(list(graph.node)):
        if n.op_type != "FusedMatMul" or len(n.input) != 2 or n.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (
            attrs.get("transB") != 1
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or any(attrs.get(k, 0) for k in ("transBatchA", "transBatchB"))
        ):
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if w.ndim != 2:
            continue
        t = numpy_helper.from_array(w.T.copy(), f"{n.input[1]}_transposed")
        graph.initializer.append(t)
        inits[t.name] = t
        graph.node.remove(n)
        graph.node.insert(i, helper.make_node("MatMul", [n.input[0], t.name], list(n.output), name=n.name or None))
        count += 1
    return count


def _name_nodes(graph) -> None:
    """The quantizer keys exclusions by node name: give unnamed nodes one."""
    for i, n in enumerate(graph.node):
        if not n.name:
            n.name = f"node_{n.op_type}_{i}"


def _quantizer_module():
    """onnxruntime's matmul_nbits_quantizer, imported without its `logging.basicConfig(level=INFO)` taking over the
    root logger (it would print every node, and other libraries' debug records)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return mnq


def _config(opts: QuantOptions, bits: int, calib_reader, ops=("MatMul",)):
    from onnxruntime.quantization.quant_utils import QuantFormat

    mnq = _quantizer_module()

    fmt = QuantFormat.QDQ if opts.format == "qdq" else QuantFormat.QOperator
    if opts.method == "hqq":
        return mnq.HQQWeightOnlyQuantConfig(block_size=opts.block_size, bits=bits)
    if opts.method == "gptq":
        return mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=calib_reader, block_size=128)
    return mnq.DefaultWeightOnlyQuantConfig(
        block_size=opts.block_size, is_symmetric=opts.symmetric, accuracy_level=opts.accuracy_level or None,
        quant_format=fmt, op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)), bits=bits,
    )  # fmt: skip


def _share_embedding(graph, emb, head_name: str, bits: int, block: int, hidden: int, vocab: int, symmetric: bool):
    """Replace the embedding Gather by Reshape(head's packed weight) -> GatherBlockQuantized [-> Slice]."""
    import numpy as np
    from onnx import helper, numpy_helper

    q = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith(head_name))
    packed, scales = q.input[1], q.input[2]
    zp = q.input[3] if len(q.input) > 3 and q.input[3] else None
    padded = (hidden + block - 1) // block * block
    base = "embed_shared"
    shape = numpy_helper.from_array(np.array([vocab, padded * bits // 8], np.int64), f"{base}/shape")
    graph.initializer.append(shape)
    nodes = [helper.make_node("Reshape", [packed, shape.name], [f"{base}/table"], name=f"{base}/Reshape")]
    out = emb.output[0]
    gathered = out if padded == hidden else f"{base}/padded"
    nodes.append(helper.make_node(
        "GatherBlockQuantized", [f"{base}/table", emb.input[1], scales] + ([zp] if zp and not symmetric else []),
        [gathered], name=f"{base}/GatherBlockQuantized", domain="com.microsoft", bits=bits, block_size=block,
        gather_axis=0, quantize_axis=1,
    ))  # fmt: skip
    if padded != hidden:
        for name, v in (("starts", 0), ("ends", hidden), ("axes", -1)):
            graph.initializer.append(numpy_helper.from_array(np.array([v], np.int64), f"{base}/{name}"))
        nodes.append(helper.make_node("Slice", [gathered, f"{base}/starts", f"{base}/ends", f"{base}/axes"], [out],
                                      name=f"{base}/Slice"))  # fmt: skip
    i = list(graph.node).index(emb)
    graph.node.remove(emb)
    for k, n in enumerate(nodes):
        graph.node.insert(i + k, n)


def quantize_proto(model, bits: int, opts: QuantOptions, config, calib_reader=None):
    """Quantize an onnx.ModelProto (weights loaded) in place of a copy; returns (ModelProto, record dict)."""
    opts = opts.resolved(bits)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    _unfuse_head(graph, inits)
    _name_nodes(graph)
    vocab = int(config.vocab_size)
    hidden = geometry(config).hidden
    head = _head_node(graph, inits, vocab)
    emb = _embedding_node(graph, inits)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_bits = opts.head_bits or bits
    # the head gets its own rtn pass when its bits differ, or when the method cannot feed a shared embedding
    # (hqq's float zero points, which GatherBlockQuantized cannot read)
    separate_head = head is not None and opts.head and (head_bits != bits or (tied and opts.method == "hqq"))
    head_method = "rtn" if separate_head else opts.method
    qop = opts.format == "qoperator"
    share = opts.embedding and tied and head is not None and opts.head and head_method == "rtn" and qop
    gather = opts.embedding and not share and emb is not None and qop and bits == 4  # the table alone: int4 rtn
    exclude = [] if (opts.head and not separate_head) or head is None else [head.name]
    n_matmul = sum(1 for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits)
    rtn = QuantOptions(**{**asdict(opts), "method": "rtn"})
    passes = [(bits, exclude, opts, ("MatMul",))]
    if separate_head:  # a second pass: only the head is still a plain MatMul
        passes.append((head_bits, [], rtn, ("MatMul",)))
    if gather:
        passes.append((4, [], rtn, ("Gather",)))
    for b, excl, o, ops in passes:
        model = _run_quantizer(model, b, o, excl, _config(o, b, calib_reader, ops))
    out = model
    packed = _pack_shared_inputs(out.graph) if opts.pack and qop else 0
    chains = 0
    if opts.method == "hqq" and not opts.float_zero_points and qop:
        chains = _integer_zero_points(out.graph, bits, opts.block_size)
    if opts.accuracy_level and qop:  # hqq and gptq write no accuracy level: the same compute for every method
        from onnx import helper

        for n in out.graph.node:
            if n.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in n.attribute):
                n.attribute.append(helper.make_attribute("accuracy_level", opts.accuracy_level))
    if share and emb is not None:
        _share_embedding(out.graph, emb, head.name, head_bits, opts.block_size, hidden, vocab, opts.symmetric)
        _drop_unused_initializers(out.graph)
    ops = [n.op_type for n in out.graph.node]
    quantized = ops.count("MatMulNBits") if opts.format == "qoperator" else ops.count("DequantizeLinear")
    embedding = "float32"
    if share and emb is not None:
        embedding = f"shared with the quantized head (GatherBlockQuantized, {head_bits} bits)"
    elif "GatherBlockQuantized" in ops:
        embedding = "quantized int4 (GatherBlockQuantized)"
    record = {**asdict(opts), "bits": bits, "symmetric": opts.symmetric and opts.method != "hqq",
              "quantizer": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
              "matmuls": n_matmul, "quantized_matmuls": quantized + packed, "packed_matmuls": packed,
              "offset_chains": chains, "head_quantized": bool(opts.head and head),
              "head_bits": head_bits if opts.head and head else None, "tied_embeddings": tied,
              "head_method": head_method if opts.head and head else None,
              "embedding_table": embedding, "activations": "float32"}  # fmt: skip
    if quantized == 0:
        raise UsageError("the quantizer found no MatMul with a constant weight to quantize in this graph")
    return out, record


def _integer_zero_points(graph, bits: int, block: int) -> int:
    """Rewrite each MatMulNBits with float zero points (hqq) to packed uint8 zero points, the layout MatMulNBits'
    fast CPU kernel takes, exactly: (q - z) * s = (q - round(z)) * s - (z - round(z)) * s, so the node keeps hqq's
    codes and scales with zero round(z), and the fractional part becomes a per-block offset C [K/block, N] added as
    (x summed over each block of K) @ C (Reshape -> ReduceSum -> MatMul -> Add). Returns how many offset chains
    were written."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    qmax = 2**bits - 1
    count = 0
    for n in list(graph.node):
        if n.op_type != "MatMulNBits" or len(n.input) < 4 or n.input[3] not in inits:
            continue
        if inits[n.input[3]].data_type != 1:  # float32 zero points only (hqq); rtn's are uint8 already
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        k, cols = int(attrs["K"]), int(attrs["N"])
        if k % block:
            continue  # the block sums need whole blocks
        kb = k // block
        scale = numpy_helper.to_array(inits[n.input[2]]).reshape(cols, kb).astype(np.float32)
        zf = numpy_helper.to_array(inits[n.input[3]]).reshape(cols, kb).astype(np.float32)
        z = np.clip(np.round(zf), 0, qmax)
        offset = (-(zf - z) * scale).T.astype(np.float32)  # [kb, N]
        zb = z.astype(np.uint8)
        if bits == 4:
            zb = np.concatenate([zb, np.zeros((cols, kb % 2), np.uint8)], 1)
            zb = zb[:, 0::2] | (zb[:, 1::2] << 4)
        inits[n.input[3]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(zb.reshape(-1)), n.input[3]))
        base, out = n.name or f"nbits{count}", n.output[0]
        for name, arr in ((f"{base}/blocks", np.array([0, 0, kb, block], np.int64)),
                          (f"{base}/axis", np.array([-1], np.int64)), (f"{base}/offset", offset)):  # fmt: skip
            graph.initializer.append(numpy_helper.from_array(arr, name))
        n.output[0] = f"{base}/int"
        extra = [
            helper.make_node("Reshape", [n.input[0], f"{base}/blocks"], [f"{base}/xb"], name=f"{base}/Reshape"),
            helper.make_node(
                "ReduceSum", [f"{base}/xb", f"{base}/axis"], [f"{base}/xs"], keepdims=0, name=f"{base}/ReduceSum"
            ),
            helper.make_node("MatMul", [f"{base}/xs", f"{base}/offset"], [f"{base}/corr"], name=f"{base}/MatMul"),
            helper.make_node("Add", [f"{base}/int", f"{base}/corr"], [out], name=f"{base}/Add"),
        ]
        i = list(graph.node).index(n)
        for j, e in enumerate(extra):
            graph.node.insert(i + 1 + j, e)
        count += 1
    return count


def _pack_shared_inputs(graph) -> int:
    """Merge the MatMulNBits nodes that read the same input with the same K, bits, block size and accuracy level
    (gate and up; q, k, v when the graph has them apart) into one node whose N is the sum of theirs, followed by a
    Split back to the original outputs: the weights, scales and zero points are stored N-major, so the merge is a
    concatenation and exact. One kernel launch instead of several, and (hqq) one block-sum offset chain per input.
    Returns how many nodes were merged away."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    groups: dict = {}
    for n in graph.node:
        if n.op_type != "MatMulNBits" or len(n.input) < 3 or len(n.input) > 4:
            continue
        if not all(x in inits for x in n.input[1:]):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        zp = inits[n.input[3]].data_type if len(n.input) == 4 else None
        key = (n.input[0], attrs.get("K"), attrs.get("bits", 4), attrs.get("block_size"),
               attrs.get("accuracy_level", 0), zp, tuple(sorted(set(attrs) - {"N"})))  # fmt: skip
        groups.setdefault(key, []).append((n, attrs))
    merged = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        nodes = [m for m, _ in members]
        sizes = [int(a["N"]) for _, a in members]
        first = nodes[0]
        base = f"{first.name}/packed"
        cat = []
        for j in range(1, len(first.input)):
            arrs = [numpy_helper.to_array(inits[m.input[j]]) for m in nodes]
            cat.append(numpy_helper.from_array(np.ascontiguousarray(np.concatenate(arrs, 0)), f"{base}/in{j}"))
        graph.initializer.extend(cat)
        attrs = {**members[0][1], "N": sum(sizes)}
        packed = helper.make_node("MatMulNBits", [first.input[0]] + [t.name for t in cat], [f"{base}/out"],
                                  name=base, domain=first.domain, **attrs)  # fmt: skip
        split_sizes = numpy_helper.from_array(np.array(sizes, np.int64), f"{base}/split")
        graph.initializer.append(split_sizes)
        split = helper.make_node("Split", [f"{base}/out", split_sizes.name], [m.output[0] for m in nodes],
                                 axis=-1, name=f"{base}/Split")  # fmt: skip
        i = list(graph.node).index(first)
        for m in nodes:
            graph.node.remove(m)
        graph.node.insert(i, packed)
        graph.node.insert(i + 1, split)
        merged += len(nodes) - 1
    if merged:
        _drop_unused_initializers(graph)
    return merged


def _drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _run_quantizer(model, bits, opts, exclude, algo):
    MatMulNBitsQuantizer = _quantizer_module().MatMulNBitsQuantizer  # noqa: N806

    q = MatMulNBitsQuantizer(
        model, bits=bits, block_size=opts.block_size, is_symmetric=opts.symmetric and opts.method != "hqq",
        accuracy_level=opts.accuracy_level or None, nodes_to_exclude=exclude, algo_config=algo,
    )  # fmt: skip
    quiet = not log.isEnabledFor(logging.INFO)  # the quantizer logs every node at INFO
    qlogs = [logging.getLogger(n) for n in ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime")]
    levels = [lg.level for lg in qlogs]
    for lg in qlogs:
        lg.setLevel(logging.WARNING if quiet else lg.level)
    try:
        q.process()
    finally:
        for lg, lv in zip(qlogs, levels):
            lg.setLevel(lv)
    return q.model.model


class WindowReader:
    """onnxruntime CalibrationDataReader over token windows: each window as one prefill with an empty cache."""

    def __init__(self, windows, config, has_cache: bool = True):
        import numpy as np

        n_layers, _, kv, head_dim = cache_geometry(config)
        self.feeds = []
        for w in windows:
            ids = np.asarray(w, np.int64)[None]
            pos = np.arange(ids.shape[1])[None]
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": pos}
            if has_cache:
                for name in kv_names(n_layers)[0]:
                    feed[name] = np.zeros((1, kv, 0, head_dim), np.float32)
            self.feeds.append(feed)
        self._it = iter(self.feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)

    def __iter__(self):
        return iter(self.feeds)

    def __deepcopy__(self, memo):  # the GPTQ path deep-copies its reader
        new = WindowReader.__new__(WindowReader)
        new.feeds, new._it = self.feeds, iter(self.feeds)
        return new


def calibration_windows(calib: str, tokenizer, num_samples: int = 10, seq_len: int = 128, seed: int = 0):
    """Token windows from the calibration set (converter.calibration), for GPTQ."""

    spec = CalibSpec(calib, num_samples, seq_len, seed)
    spec.validate()
    batch = load_calibration(spec, tokenizer)
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, batch.attention_mask)]


def quantize_export(onnx_dir, out, precision: str = "int4", quant=None, calib: str | None = None,
                    force: bool = False, external_data_threshold: int | None = 1024) -> dict:  # fmt: skip
    """Quantize an fp32 export directory (`shortened export onnx`) into `out`: the same graph with int4/int8 MatMul
    weights and the same side files; export.json records the source and every choice. No re-trace: `convert` makes
    each precision of its list from one fp32 export this way."""
    import json
    import shutil
    from pathlib import Path

    import onnx
    import onnx_ir
    from transformers import AutoConfig

    src = Path(onnx_dir)
    record = json.loads((src / RECORD_FILE).read_text()) if (src / RECORD_FILE).is_file() else {}
    if not (src / ONNX_FILE).is_file():
        raise UsageError(f"{onnx_dir} holds no {ONNX_FILE}; pass a directory written by `shortened export onnx`")
    if record.get("precision", "fp32") != "fp32":
        raise UsageError(f"{onnx_dir} is a {record['precision']} export; quantize an fp32 export")
    opts = quant_options_for(precision, quant, False, calib)
    check_output_dir(out, force, inputs=(str(src),))
    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(src)
    proto = onnx.load(str(src / ONNX_FILE))
    if opts.format == "qdq" and any(n.domain == "com.microsoft" for n in proto.graph.node):
        raise UsageError(f"{onnx_dir} is the fused onnxruntime graph; the QDQ format is for TensorRT, which cannot run "
                         "it: quantize an export made without --optimize")  # fmt: skip
    reader = None
    if opts.method == "gptq":
        from transformers import AutoTokenizer

        has_cache = any(i.name.startswith("past_key_values") for i in proto.graph.input)
        reader = WindowReader(calibration_windows(calib, AutoTokenizer.from_pretrained(src)), config, has_cache)
    qproto, qrec = quantize_proto(proto, BITS[precision], opts, config, reader)
    if reader is not None:
        qrec["calibration"] = {"source": str(calib), "windows": len(reader.feeds)}
    qrec["seconds"] = round(time.perf_counter() - t0, 2)
    with atomic_dir(out, force, inputs=(str(src),)) as staging:
        model = onnx_ir.from_proto(qproto)
        save_graph(model, staging / ONNX_FILE, external_data_threshold)
        for p in src.iterdir():
            if p.is_file() and p.name not in (ONNX_FILE, DATA_FILE, RECORD_FILE):
                shutil.copy2(p, staging / p.name)
        files = [p for p in staging.iterdir() if p.name.startswith(ONNX_FILE)]
        summary = {**{k: v for k, v in record.items() if k != "versions"}, "path": str(Path(out) / ONNX_FILE),
                   "precision": precision, "nodes": len(qproto.graph.node), "quantized_from": str(src),
                   "opset": next((o.version for o in qproto.opset_import if o.domain in ("", "ai.onnx")), None),
                   "size_bytes": sum(p.stat().st_size for p in files), "external_data": (staging / DATA_FILE).is_file(),
                   "quantization": qrec}  # fmt: skip
        write_json(staging / RECORD_FILE, {**summary, "versions": record.get("versions")})
    return summary


__all__ = ["BITS", "METHODS", "QuantOptions", "WindowReader", "calibration_windows", "quantize_export",
           "quantize_proto"]  # fmt: skip


def quant_options_for(precision, quant, optimize, calib):
    """The QuantOptions of an int4/int8 export (None for float precisions), resolved and checked before any work."""

    if precision not in QUANTIZED:
        if quant:
            raise UsageError(f"quantization options apply to --precision int4/int8, not {precision}")
        return None
    if isinstance(quant, dict):
        import dataclasses

        names = {f.name for f in dataclasses.fields(QuantOptions)}
        unknown = sorted(set(quant) - names)
        if unknown:
            raise UsageError(f"unknown quantization option {unknown[0]!r}; known: {', '.join(sorted(names))}")
        quant = QuantOptions(**quant)
    opts = (quant or QuantOptions()).resolved(BITS[precision])
    opts.validate(BITS[precision])
    if opts.format == "qdq" and optimize:
        raise UsageError("the QDQ format is for TensorRT, which cannot run the fused graph: drop --optimize")
    if opts.method == "gptq" and not calib:
        raise UsageError("GPTQ needs calibration text: pass --calib FILE (the calibration set)")
    return opts
