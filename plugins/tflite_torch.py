"""A small TFLite -> torch reader: runs a .tflite graph as a differentiable torch module.

The pure-Python `tflite` package parses the flatbuffer; this module rebuilds the graph for
the operators the shipped models use (facex's MobileNetV2, MediaPipe's face mesh), with TFLite
semantics kept literally: tensors stay NHWC as in the file, convolutions permute to NCHW and
back, "SAME" padding puts the odd pixel bottom/right. Constant tensors are dequantised once at
load time: float16 (DEQUANTIZE ops are folded) and weight-only int8 (hybrid) quantisation, per
tensor or per channel. A `uint8` tag with zero point 0 holds int8 bytes (facex's converter
wrote it that way): `q.view(int8) * scale`. Fully quantised graphs (int8 activations) are
refused with a clear error. No TensorFlow or LiteRT is needed; both are only test references.
"""
from __future__ import annotations

from pathlib import Path

# TFLite TensorType codes -> numpy dtype names
_DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 9: "int8", 7: "int16"}
# ActivationFunctionType
_FUSED = {0: None, 1: "relu", 2: "relu_n1_to_1", 3: "relu6", 4: "tanh"}


class TFLiteError(ValueError):
    pass


def _opname(code: int) -> str:
    import tflite

    for k, v in vars(tflite.BuiltinOperator).items():
        if v == code and not k.startswith("_"):
            return k
    return f"op{code}"


def _options(op, cls):
    table = op.BuiltinOptions()
    if table is None:
        return None
    opt = cls()
    opt.Init(table.Bytes, table.Pos)
    return opt


def read_tflite(path: str | Path):
    """(tensors, operators, inputs, outputs) of subgraph 0 as plain Python/numpy records."""
    import numpy as np
    import tflite

    buf = Path(path).read_bytes()
    model = tflite.Model.GetRootAsModel(buf, 0)
    if model.SubgraphsLength() != 1:
        raise TFLiteError(f"{path}: {model.SubgraphsLength()} subgraphs; only single-subgraph models are supported")
    sg = model.Subgraphs(0)
    tensors = []
    for i in range(sg.TensorsLength()):
        t = sg.Tensors(i)
        dtype = _DTYPES.get(t.Type())
        shape = [int(s) for s in t.ShapeAsNumpy()] if t.ShapeLength() else []
        data = model.Buffers(t.Buffer()).DataAsNumpy() if t.Buffer() < model.BuffersLength() else 0
        value = None
        if not isinstance(data, int) and data.size:
            if dtype is None:
                raise TFLiteError(f"{path}: tensor {t.Name().decode()} has TFLite type {t.Type()}, which this reader does not know")
            value = np.frombuffer(data.tobytes(), dtype=dtype).reshape(shape)
        q = t.Quantization()
        scale = q.ScaleAsNumpy() if q is not None and q.ScaleLength() else None
        zero = q.ZeroPointAsNumpy() if q is not None and q.ZeroPointLength() else None
        tensors.append({"name": t.Name().decode(), "shape": shape, "dtype": dtype, "value": value, "scale": scale,
                        "zero_point": zero, "axis": q.QuantizedDimension() if q is not None else 0})
    ops = []
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        oc = model.OperatorCodes(op.OpcodeIndex())
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        name = _opname(code)
        opts = {}
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            o = _options(op, tflite.Conv2DOptions if name == "CONV_2D" else tflite.DepthwiseConv2DOptions)
            opts = {"padding": o.Padding(), "stride": (o.StrideH(), o.StrideW()), "act": o.FusedActivationFunction(),
                    "dilation": (o.DilationHFactor(), o.DilationWFactor())}
        elif name in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
            o = _options(op, tflite.Pool2DOptions)
            opts = {"padding": o.Padding(), "stride": (o.StrideH(), o.StrideW()), "kernel": (o.FilterHeight(), o.FilterWidth()),
                    "act": o.FusedActivationFunction()}
        elif name in ("ADD", "MUL", "SUB"):
            cls = {"ADD": tflite.AddOptions, "MUL": tflite.MulOptions, "SUB": tflite.SubOptions}[name]
            o = _options(op, cls)
            opts = {"act": o.FusedActivationFunction() if o is not None else 0}
        elif name == "FULLY_CONNECTED":
            o = _options(op, tflite.FullyConnectedOptions)
            opts = {"act": o.FusedActivationFunction(), "keep_dims": bool(o.KeepNumDims())}
        elif name == "CONCATENATION":
            o = _options(op, tflite.ConcatenationOptions)
            opts = {"axis": o.Axis(), "act": o.FusedActivationFunction()}
        elif name == "MEAN":
            o = _options(op, tflite.ReducerOptions)
            opts = {"keep_dims": bool(o.KeepDims()) if o is not None else False}
        elif name == "SOFTMAX":
            o = _options(op, tflite.SoftmaxOptions)
            opts = {"beta": o.Beta() if o is not None else 1.0}
        elif name == "RESHAPE":
            o = _options(op, tflite.ReshapeOptions)
            opts = {"new_shape": [int(s) for s in o.NewShapeAsNumpy()] if o is not None and o.NewShapeLength() else None}
        ops.append({"op": name, "inputs": [int(v) for v in op.InputsAsNumpy()], "outputs": [int(v) for v in op.OutputsAsNumpy()], **opts})
    return tensors, ops, [int(v) for v in sg.InputsAsNumpy()], [int(v) for v in sg.OutputsAsNumpy()]


def dequantize(t: dict):
    """float32 numpy value of a constant tensor (float, float16, or weight-only int8/uint8)."""
    import numpy as np

    v = t["value"]
    if t["dtype"] in ("float32", "float16"):
        return v.astype(np.float32)
    if t["scale"] is None:
        return v  # integer constants (shapes, axes, paddings)
    zero = t["zero_point"] if t["zero_point"] is not None else np.zeros(1, np.int64)
    if t["dtype"] == "uint8" and not zero.any():
        v = v.view(np.int8)  # int8 bytes under a uint8 tag (zero point 0 cannot be a real uint8 quantisation)
    shape = [1] * v.ndim
    if t["scale"].size > 1:
        shape[t["axis"]] = -1
    return ((v.astype(np.float32) - zero.reshape(shape).astype(np.float32)) * t["scale"].reshape(shape).astype(np.float32))


def build_tflite_graph(path: str | Path, logits: bool = True):
    """A torch module that runs the TFLite model at `path` on NHWC float input.

    `logits=True` stops before a final SOFTMAX that produces a graph output and returns its
    input (guidance needs logits). forward() returns one tensor, or a list when the graph has
    several outputs. Constants are buffers: the module has no trainable parameters.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    tensors, ops, inputs, outputs = read_tflite(path)
    const: dict[int, np.ndarray] = {i: dequantize(t) for i, t in enumerate(tensors) if t["value"] is not None}
    plan = []
    for op in ops:
        if op["op"] == "DEQUANTIZE" and op["inputs"][0] in const:  # float16 / int8 constants: fold
            const[op["outputs"][0]] = const[op["inputs"][0]].astype(np.float32)
            continue
        for i in op["inputs"]:
            t = tensors[i] if i >= 0 else None
            if t is not None and i not in const and t["dtype"] not in ("float32", None):
                raise TFLiteError(f"{path}: operator {op['op']} reads {t['dtype']} activations ({t['name']}); "
                                  f"only float graphs with float16/int8 weights are supported, not fully quantised ones")
        plan.append(op)
    if logits and plan and plan[-1]["op"] == "SOFTMAX" and plan[-1]["outputs"][0] in outputs:
        outputs = [plan[-1]["inputs"][0] if o == plan[-1]["outputs"][0] else o for o in outputs]
        plan = plan[:-1]

    def act(x, code):
        kind = _FUSED.get(code, "?")
        if kind is None:
            return x
        if kind == "relu":
            return F.relu(x)
        if kind == "relu6":
            return x.clamp(0.0, 6.0)
        if kind == "relu_n1_to_1":
            return x.clamp(-1.0, 1.0)
        if kind == "tanh":
            return torch.tanh(x)
        raise TFLiteError(f"fused activation {code} is not supported")

    def same_pad(x, k, s, d=(1, 1), value=0.0):  # x NCHW; TF "SAME": the odd pixel goes bottom/right
        pads = []
        for size, kk, ss, dd in ((x.shape[-1], k[1], s[1], d[1]), (x.shape[-2], k[0], s[0], d[0])):
            total = max((-(-size // ss) - 1) * ss + (kk - 1) * dd + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads, value=value) if any(pads) else x

    class TFLiteGraph(nn.Module):
        def __init__(self):
            super().__init__()
            self.plan, self.inputs, self.outputs = plan, inputs, outputs
            self.input_shapes = [tuple(tensors[i]["shape"]) for i in inputs]  # NHWC as in the file
            self.const_ids = sorted(const)
            for i in self.const_ids:
                self.register_buffer(f"c{i}", torch.from_numpy(np.array(const[i], copy=True)), persistent=False)
            # conv kernels in torch layout, prepared once
            for n, op in enumerate(plan):
                if op["op"] == "CONV_2D":
                    self.register_buffer(f"w{n}", self._c(op["inputs"][1]).permute(0, 3, 1, 2).contiguous(), persistent=False)
                elif op["op"] == "DEPTHWISE_CONV_2D":
                    self.register_buffer(f"w{n}", self._c(op["inputs"][1]).permute(3, 0, 1, 2).contiguous(), persistent=False)

        def _c(self, i):
            return getattr(self, f"c{i}")

        def _v(self, vals, i):
            if i < 0:
                return None
            return vals[i] if i in vals else self._c(i)

        def _int(self, i):
            return [int(v) for v in np.asarray(const[i]).reshape(-1)]

        def forward(self, *xs):
            vals = dict(zip(self.inputs, xs))
            for n, op in enumerate(self.plan):
                name, ins = op["op"], op["inputs"]
                x = self._v(vals, ins[0])
                if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
                    w, b = getattr(self, f"w{n}"), self._v(vals, ins[2]) if len(ins) > 2 else None
                    y = x.permute(0, 3, 1, 2)
                    if op["padding"] == 0:  # SAME
                        y = same_pad(y, w.shape[-2:], op["stride"], op["dilation"])
                    groups = y.shape[1] if name == "DEPTHWISE_CONV_2D" else 1
                    y = F.conv2d(y, w, b, op["stride"], 0, op["dilation"], groups)
                    out = act(y.permute(0, 2, 3, 1), op["act"])
                elif name in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
                    y = x.permute(0, 3, 1, 2)
                    k, s = op["kernel"], op["stride"]
                    if name == "MAX_POOL_2D":
                        if op["padding"] == 0:
                            y = same_pad(y, k, s, value=float("-inf"))
                        y = F.max_pool2d(y, k, s)
                    else:  # TFLite averages over the valid (unpadded) pixels only
                        ones = torch.ones_like(y[:, :1])
                        if op["padding"] == 0:
                            y, ones = same_pad(y, k, s), same_pad(ones, k, s)
                        y = F.avg_pool2d(y, k, s) / F.avg_pool2d(ones, k, s)
                    out = act(y.permute(0, 2, 3, 1), op["act"])
                elif name in ("ADD", "MUL", "SUB"):
                    y = self._v(vals, ins[1])
                    out = act(x + y if name == "ADD" else x * y if name == "MUL" else x - y, op["act"])
                elif name == "FULLY_CONNECTED":
                    w, b = self._c(ins[1]), self._v(vals, ins[2]) if len(ins) > 2 else None
                    y = F.linear(x.reshape(-1, w.shape[1]), w, b)
                    if op["keep_dims"]:
                        y = y.reshape(*x.shape[:-1], w.shape[0])
                    out = act(y, op["act"])
                elif name == "MEAN":
                    axes = [a % x.dim() for a in self._int(ins[1])]
                    out = x.mean(dim=axes, keepdim=op["keep_dims"])
                elif name == "PAD":
                    p = np.asarray(const[ins[1]]).reshape(-1, 2)
                    out = F.pad(x, [int(v) for pair in p[::-1] for v in pair])
                elif name == "RESHAPE":
                    shape = self._int(ins[1]) if len(ins) > 1 and ins[1] in const else op["new_shape"]
                    out = x.reshape([x.shape[0], *shape[1:]] if shape and shape[0] in (1, -1) else shape)  # the batch stays free
                elif name == "CONCATENATION":
                    out = act(torch.cat([self._v(vals, i) for i in ins], dim=op["axis"]), op["act"])
                elif name == "PRELU":
                    alpha = self._v(vals, ins[1])
                    out = F.relu(x) - alpha * F.relu(-x)
                elif name == "RELU":
                    out = F.relu(x)
                elif name == "RELU6":
                    out = x.clamp(0.0, 6.0)
                elif name == "LOGISTIC":
                    out = torch.sigmoid(x)
                elif name == "TANH":
                    out = torch.tanh(x)
                elif name == "HARD_SWISH":
                    out = F.hardswish(x)
                elif name == "SOFTMAX":
                    out = torch.softmax(x * op["beta"], dim=-1)
                elif name == "DEQUANTIZE":
                    out = x.float()
                else:
                    raise TFLiteError(f"TFLite operator {name} is not supported by this reader (plugins/tflite_torch.py)")
                vals[op["outputs"][0]] = out
            res = [vals[o] for o in self.outputs]
            return res[0] if len(res) == 1 else res

    return TFLiteGraph().eval()
