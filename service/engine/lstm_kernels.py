"""Inference kernels for a trained CharLSTM: prepacked oneDNN matmuls, the fused decode step and the
prompt encoder, in float32 or bfloat16. In float32 they compute what `nn.LSTM` computes (the prompt
encoder to the bit; the step's matmuls within float32 rounding); used only by the serving engine."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from seqmodels.networks import CharLSTM, LSTMState, bfloat16_units

T = TypeVar("T")


def choose_precision(setting: str) -> tuple[torch.dtype, str]:
    """The weights' dtype for PRECISION `setting` ("auto", "float32" or "bfloat16"), and why."""
    if setting != "auto":
        return getattr(torch, setting), f"PRECISION={setting}"
    units = bfloat16_units(torch.device("cpu"))
    if units is None:
        return torch.float32, "auto: this CPU has no bfloat16 units"
    return torch.bfloat16, f"auto: this CPU has {units} units"


def _one_openmp_thread_here() -> None:
    """This thread's operators on one thread. torch.set_num_threads would change every thread's count
    (torch keeps one for the process, which each thread copies when it first runs an operator), so this
    sets the calling thread's own OpenMP count, once torch has set it; without GNU OpenMP, nothing."""
    torch.get_num_threads()  # torch sets this thread's count now, not after us
    if (gomp := _gnu_openmp()) is not None:
        gomp.omp_set_num_threads(1)


@functools.cache
def _gnu_openmp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime torch loaded, or None where it uses another."""
    with contextlib.suppress(OSError, AttributeError):
        library = ctypes.CDLL("libgomp.so.1")
        library.omp_set_num_threads  # noqa: B018 - raises AttributeError where it is missing
        return library
    return None


def off_the_scheduler(compute: Callable[[], T]) -> T:
    """`compute()`, on a thread of its own that ends with it and runs its operators on one thread, where
    the worker runs torch on more than one (TORCH_THREADS > 1); called where it is, otherwise.

    With more than one torch thread, the scheduler thread's OpenMP threads wait for each other at every
    step of a prompt's encoding, and GNU OpenMP keeps them spinning there only while it manages no more
    threads than there are CPUs. Any other thread that has run an operator counts as managed for as
    long as it lives: from then on the scheduler's threads sleep and wake at every step, and encoding
    a prompt takes several times as long. Request threads and the model watcher live as long as the
    worker, so their heavy work (scoring, classifying, loading a model) runs on a passing thread."""
    if torch.get_num_threads() == 1:
        return compute()
    # One thread, ended when the `with` does; a failure is raised again here by result().
    with ThreadPoolExecutor(1, thread_name_prefix="compute", initializer=_one_openmp_thread_here) as passing:
        return passing.submit(compute).result()


class PackedLinear:
    """`x @ weight.T + bias` for an inference-only weight, prepacked once for oneDNN.

    MKL's sgemm, which `torch.addmm` calls, can cost nearly k times one row for k rows, so batching
    sequences would save little; oneDNN's matmul on a weight reordered once to its blocked layout costs
    far less per row as rows are added, and each row's result does not depend on the other rows
    (`python -m benchmarks.matmul` measures both; docs/performance.md has the figures). The two oneDNN
    ops are internal to PyTorch (its compiler uses them), so a build without them, or one whose result
    disagrees with `addmm` on a probe, gets `addmm`.
    """

    BATCH_HINT = 32  # rows oneDNN picks its blocking for (the batch sizes continuous batching runs at)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> None:
        """`weight` (out, in) and `bias` (out,) in float32; `dtype` is that of the matmul: float32, or
        bfloat16 for half the weight memory traffic (the input is rounded to it, the result is float32)."""
        self.dtype = dtype
        self.nbytes = weight.numel() * torch.tensor([], dtype=dtype).element_size()
        self.packed: torch.Tensor | None = None
        weight = weight.detach().to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.transposed = weight.t().contiguous()  # for addmm, the fallback
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.BATCH_HINT)
            probe = torch.linspace(-1, 1, 3 * weight.size(1)).reshape(3, -1).to(dtype)
            got = torch.ops.mkldnn._linear_pointwise(probe, packed, self.bias, "none", [], "")
            if torch.allclose(got.float(), self._addmm(probe).float(), rtol=1e-2, atol=1e-3):
                self.packed = packed
                self.transposed = torch.empty(0)  # one copy of the weight is enough
        except (AttributeError, RuntimeError, NotImplementedError):
            pass

    @property
    def uses_onednn(self) -> bool:
        return self.packed is not None

    def _addmm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mm(x, self.transposed) if self.bias is None else torch.addmm(self.bias, x, self.transposed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in) float32 -> (B, out) float32."""
        x = x.to(self.dtype)
        if self.packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        else:
            out = self._addmm(x)
        return out.float()


class FusedStep:
    """Inference-only single step of a trained CharLSTM, for decoding a batch one character at a time.

    `nn.LSTM` called on one time step re-checks its weights, projects the input with its own matmul
    and allocates every intermediate. Here the first layer's input projection (embedding x W_ih, plus
    both biases) is a precomputed table indexed by character, every layer costs one prepacked
    matmul (`PackedLinear`), and the gate nonlinearities and the cell update run in place on the
    batch's state.
    """

    def __init__(self, lm: CharLSTM, dtype: torch.dtype = torch.float32) -> None:
        """`dtype` is that of the weights: float32, or bfloat16 for half the memory traffic. The decode
        step's matmuls take it (see `PackedLinear`) while its state, gates and input table stay float32;
        the prompt encoder runs oneDNN's LSTM layer wholly in it, and hands back a float32 state."""
        self.lm = lm
        self.hidden_size = size = lm.config.hidden_size
        self.dtype = dtype
        weights: dict[str, torch.Tensor] = dict(lm.lstm.named_parameters())
        # PyTorch stacks the gates as input, forget, cell, output; here they are input, forget,
        # output, cell, so that one sigmoid covers the first three.
        gate_order = torch.cat(
            [torch.arange(0, 2 * size), torch.arange(3 * size, 4 * size), torch.arange(2 * size, 3 * size)]
        )

        def w(name: str) -> torch.Tensor:
            return weights[name][gate_order]

        def bias(layer: int) -> torch.Tensor:
            return w(f"bias_ih_l{layer}") + w(f"bias_hh_l{layer}")

        with torch.no_grad():
            self.input_table = torch.addmm(bias(0), lm.embed.weight, w("weight_ih_l0").t()).contiguous()
            self.recurrent0 = PackedLinear(w("weight_hh_l0"), None, dtype)
            self.upper: list[PackedLinear] = []  # per layer >= 1: [x, h] -> gates, with both biases
            for layer in range(1, lm.config.num_layers):
                stacked = torch.cat([w(f"weight_ih_l{layer}"), w(f"weight_hh_l{layer}")], dim=1)
                self.upper.append(PackedLinear(stacked, bias(layer), dtype))
            # The head stays float32 in every precision: a small share of the step's weights, and
            # logits rounded to bfloat16's 8 bits of mantissa would tie characters that differ.
            self.head = PackedLinear(lm.head.weight, lm.head.bias, torch.float32)
        # Prompt encoding calls oneDNN's LSTM layer (what nn.LSTM calls on this CPU) on weights
        # reordered for it once, here: nn.LSTM reorders them on every call, which costs as much as
        # 30 to 50 time steps. In float32 its results matched nn.LSTM's exactly wherever compared; the
        # probe below accepts float32 rounding (1e-4), the tests 1e-5.
        self.rnn_layers: list[tuple[torch.Tensor, ...]] | None = None
        try:
            layers = []
            for layer in range(lm.config.num_layers):
                w_ih, w_hh = (weights[f"weight_{kind}_l{layer}"].detach() for kind in ("ih", "hh"))
                b_ih, b_hh = (weights[f"bias_{kind}_l{layer}"].detach() for kind in ("ih", "hh"))
                packed = torch.ops.mkldnn._reorder_mkldnn_rnn_layer_weight(
                    w_ih.to(dtype), w_hh.to(dtype), size, False, True, False
                )
                layers.append((*packed, b_ih.to(dtype), b_hh.to(dtype)))
            self.rnn_layers = layers
            probe = [[1, 2, 3], [2]]
            with torch.inference_mode():
                got, expected = self.prefill(probe)[0], torch.cat([lm.prefill([s])[0] for s in probe])
            # A probe for a layer that computes something else (another gate order, say), not for
            # rounding: bfloat16 keeps 8 bits of mantissa, so its logits are off by a few hundredths.
            tolerance = 1e-4 if dtype == torch.float32 else 0.25
            if not torch.allclose(got, expected, rtol=tolerance, atol=tolerance):
                self.rnn_layers = None
        except (AttributeError, RuntimeError, NotImplementedError):
            self.rnn_layers = None
        self.nbytes = (
            self.input_table.numel() * 4
            + sum(linear.nbytes for linear in [self.recurrent0, *self.upper, self.head])
            + sum(t.numel() * t.element_size() for layer in self.rnn_layers or [] for t in layer)
        )

    PREFILL_CHUNK = 256  # time steps per oneDNN call at most; bounds the memory that long prompts take

    def _cell(self, gates: torch.Tensor, c: torch.Tensor, h: torch.Tensor) -> None:
        """Gates in the order input, forget, output, cell; c and h (B, H) are updated in place."""
        size = self.hidden_size
        gates[:, : 3 * size].sigmoid_()
        gates[:, 3 * size :].tanh_()
        c.mul_(gates[:, size : 2 * size]).addcmul_(gates[:, :size], gates[:, 3 * size :])
        torch.tanh(c, out=h)
        h.mul_(gates[:, 2 * size : 3 * size])

    def __call__(self, ids: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Feed characters `ids` (B,) to states h, c (layers, B, H), updated in place; returns logits (B, V)."""
        gates = self.recurrent0(h[0]).add_(self.input_table[ids])
        self._cell(gates, c[0], h[0])
        for layer, affine in enumerate(self.upper, start=1):
            gates = affine(torch.cat([h[layer - 1], h[layer]], dim=1))
            self._cell(gates, c[layer], h[layer])
        return self.head(h[-1])

    def prefill(
        self, sequences: Sequence[Sequence[int]], initial: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        """Run each input sequence (at least one id) from its initial state: the logits after its last
        input (B, V) and the state there (layers, B, H), rows in the order given.

        `initial` (h, c), each (layers, B, H), is the state each row starts from, in the order given
        (a cached prefix's or a session's); None is the zero state, where a sequence starts with the
        start symbol.

        Sequences of different lengths are aligned at their ends: sorted longest first, a row joins
        at the step where its sequence starts, so the rows running over any stretch of steps are a
        prefix of the batch, and each stretch is one oneDNN call per layer with no padding computed.
        A row's state is untouched until it joins, so it joins from its initial state.
        """
        if self.rnn_layers is None:  # no oneDNN: nn.LSTM, once per group of one length
            return self._prefill_by_length(sequences, initial)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        lengths = [len(sequences[i]) for i in order]
        steps, rows, size = lengths[0], len(order), self.hidden_size
        ids = torch.zeros(steps, rows, dtype=torch.long)
        for row, source in enumerate(order):
            ids[steps - lengths[row] :, row] = torch.tensor(sequences[source], dtype=torch.long)
        inputs = self.lm.embed(ids)  # (T, B, E), time first as oneDNN takes it
        if initial is None:
            h, c = (torch.zeros(self.lm.config.num_layers, rows, size, dtype=self.dtype) for _ in range(2))
        else:
            index = torch.tensor(order)
            h, c = (part[:, index].to(self.dtype).contiguous() for part in initial)
        bounds = [*sorted({steps - n for n in lengths} | set(range(0, steps, self.PREFILL_CHUNK))), steps]
        for begin, end in itertools.pairwise(bounds):
            k = sum(1 for n in lengths if steps - n <= begin)  # rows that have started by `begin`
            _, h[:, :k], c[:, :k] = self._layers(inputs[begin:end, :k], h[:, :k], c[:, :k])
        h, c = h.float(), c.float()
        logits = self.lm.head(h[-1])
        back = torch.tensor(order).argsort()
        return logits[back], (h[:, back], c[:, back])

    def sequence(self, ids: torch.Tensor, initial: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        """The logits after every input of a batch (B, T) (B, T, V) and the state after the last, each row
        from its state in `initial` (zero state: None); what `CharLSTM.forward` computes, in this kernel's
        precision. For scoring, whose rows are right-padded: a padded row's final state is meaningless."""
        if self.rnn_layers is None:
            logits, _, state = self.lm(ids, state=initial)
            return logits, state
        rows, steps = ids.shape
        if initial is None:
            h, c = (torch.zeros(self.lm.config.num_layers, rows, self.hidden_size, dtype=self.dtype)
                    for _ in range(2))  # fmt: skip
        else:
            h, c = (part.to(self.dtype, memory_format=torch.contiguous_format, copy=True) for part in initial)
        outputs = []
        for begin in range(0, steps, self.PREFILL_CHUNK):
            x, h, c = self._layers(self.lm.embed(ids[:, begin : begin + self.PREFILL_CHUNK].t()), h, c)
            outputs.append(self.lm.head(x.float()))
        return torch.cat(outputs).transpose(0, 1), (h.float(), c.float())

    def _layers(
        self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every layer over inputs x (T, B, E) float32, time first, from states h, c (layers, B, H) in the
        kernel's dtype: the last layer's outputs (T, B, H) and the new states (fresh tensors)."""
        size, layers = self.hidden_size, self.lm.config.num_layers
        assert self.rnn_layers is not None
        # Not reversed, no packed batch sizes, mode 2 (LSTM), with biases, one direction, time first, inference.
        flags: tuple[Any, ...] = (False, [], 2, size, layers, True, False, False, False)
        x = x.to(self.dtype).contiguous()
        h_out, c_out = torch.empty_like(h), torch.empty_like(c)
        for layer, weights in enumerate(self.rnn_layers):
            x, h_out[layer], c_out[layer], _ = torch.ops.aten.mkldnn_rnn_layer(
                x, *weights, h[layer].contiguous(), c[layer].contiguous(), *flags
            )
        return x, h_out, c_out

    def _prefill_by_length(
        self, sequences: Sequence[Sequence[int]], initial: LSTMState | None
    ) -> tuple[torch.Tensor, LSTMState]:
        groups: dict[int, list[int]] = {}
        for i, sequence in enumerate(sequences):
            groups.setdefault(len(sequence), []).append(i)
        layers, size = self.lm.config.num_layers, self.hidden_size
        logits = torch.empty(len(sequences), self.lm.config.vocab_size)
        h, c = torch.empty(layers, len(sequences), size), torch.empty(layers, len(sequences), size)
        for members in groups.values():
            index = torch.tensor(members)
            start = None if initial is None else (initial[0][:, index], initial[1][:, index])
            logits[index], (h[:, index], c[:, index]) = self.lm.prefill([sequences[i] for i in members], start)
        return logits, (h, c)
