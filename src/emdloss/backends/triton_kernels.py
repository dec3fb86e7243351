"""The Triton kernel of the ``"triton"`` backend (:mod:`.triton_gpu`): imported on its first call, never by
``import emdloss``, since it imports triton.

One program per row (persistent: ``P`` programs loop over the rows ``pid, pid + P, ...``), in the DFS-interval
form of docs/algorithm.md. Nodes are numbered by DFS pre-order position ``k = 0 .. n-1`` (the root is 0); the
subtree of position ``k`` is ``[k, end_k)`` and the edge above it has the loss weight ``w_k`` (0 for the root
and for edges above every class, :func:`.base.loss_weights`). With ``d = p - q`` put at the classes' positions
(0 elsewhere) and ``c`` its exclusive prefix sum (``c_n`` the total)::

    f_k  = c[end_k] - c[k]                                   flow across the edge above position k
    L    = sum_k w_k |f_k|^rho
    h_k  = dL/df_k = rho w_k sign(f_k) |f_k|^(rho-1)
    G_j  = sum_{k : k <= j < end_k} h_k                      dL/dd at position j (the edges above j)
         = sum_{k <= j} h_k  -  sum_{k : end_k <= j} h_k      (two prefix sums: by position, by end)
    dL/dx_j = p_j (G_j - <p, G>)  through the softmax;   dL/dp_j = G_j  for probabilities

The second prefix sum runs over the edges sorted by ``end_k`` (``end_order``; only edges with ``end_k < n``
can matter), and ``ended[j]`` counts those with ``end_k <= j``, so it is one gather: no atomics, and the result
is deterministic. Values another lane needs (``c`` for the two gathers per edge, ``h``, the prefix sums, ``G``)
go through a per-program scratch row in global memory, read back after a block barrier with ``.cg`` loads
(L2, never a stale L1 line).

Passes over one row, each looping over chunks of ``BLOCK`` with a carried running sum, so any number of nodes
runs (a multi-chunk scan within the program; no size limit and no fallback):

1. classes, contiguous: softmax max and sum (online, per lane);
2. positions: ``d`` (gathering logits by ``node_class``), prefix sum ``c`` -> scratch 1;
3. positions: flows from two gathers of scratch 1, the loss, ``h`` -> scratch 2; the loss is stored;
4. (gradient) edges in end order: prefix sum of ``h`` -> scratch 1;
5. (gradient) positions: ``G`` -> scratch 2, and ``<p, G>``;
6. (gradient) classes, contiguous: ``p_j (G_j - <p, G>)`` -> the (M, C) gradient.

Arithmetic: the softmax and ``d`` in float32 (float64 for float64 input), as the reference computes them; the
prefix sums, flows, loss and ``G`` in float64 (cancellation in a long running sum of both signs is what the
reference's float64 guards against too); ``|f|^(rho-1)`` for rho other than 1 and 2 in float32 (GPUs have no
fast float64 ``exp``/``log``), about 1e-7 relative. Rows whose label is ``ignore_index`` get loss 0 and
gradient 0; a label outside [0, C) that is not ``ignore_index`` gets a NaN loss (never an out-of-bounds read),
which the finite-loss check names.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs


def language_interpreted() -> bool:
    """Whether ``triton.language`` was imported under ``TRITON_INTERPRET=1``: its own jitted functions
    (``tl.sum``, ``tl.cumsum``, ...) are then interpreted too. Setting the variable after that import is too
    late for them, and a kernel made then cannot run at all (neither interpreted nor compiled)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


#: Whether the kernel below runs in Triton's interpreter, on CPU tensors with numpy (``TRITON_INTERPRET=1`` set
#: before triton was first imported).
INTERPRETED: bool = bool(knobs.runtime.interpret) and language_interpreted()
#: Why the kernel cannot run at all (the variable set after triton.language was imported), or None.
BROKEN: str | None = (
    "TRITON_INTERPRET=1 was set after triton was first imported; set it before anything imports triton"
    if bool(knobs.runtime.interpret) != language_interpreted()
    else None
)

#: The largest chunk of classes or nodes one loop step handles (a power of two). Tests lower it to exercise
#: the multi-chunk scans on small trees.
MAX_BLOCK = 1024

#: Scratch memory the persistent programs may use together (bytes), at least one program per SM regardless.
SCRATCH_BUDGET = 1 << 30

RHO_ONE, RHO_TWO, RHO_OTHER = 1, 2, 3


@triton.jit
def _zero64(BLOCK: tl.constexpr):
    return tl.sum(tl.zeros([BLOCK], tl.float64), 0)


@triton.jit
def tree_rows_kernel(
    x_ptr,
    labels_ptr,
    soft_ptr,
    loss_ptr,
    grad_ptr,
    scratch_ptr,
    node_class_ptr,
    node_end_ptr,
    node_w_ptr,
    class_pos_ptr,
    end_order_ptr,
    ended_ptr,
    M,
    C,
    n,
    E2,
    sxr,
    sxc,
    ssr,
    ssc,
    rho,
    ignore_index,
    FROM_LOGITS: tl.constexpr,
    SOFT: tl.constexpr,
    RHO_KIND: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    PT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    s1 = scratch_ptr + pid.to(tl.int64) * (2 * n + 2)  # c, then the end-order prefix sum of h: n + 1 values
    s2 = s1 + n + 1  # h, then G: n values
    for i in range(tl.cdiv(M - pid, nprog)):
        tl.debug_barrier()  # the previous row's last reads of the scratch are done before it is rewritten
        r64 = pid.to(tl.int64) + i * nprog  # row pid + i * P, as int64 (r64 * C may pass 2^31)
        x_row = x_ptr + r64 * sxr
        if SOFT:
            label = r64 * 0 - 1  # unused
            keep = r64 >= 0
            bad = r64 < 0
        else:
            label = tl.load(labels_ptr + r64)
            keep = label != ignore_index
            bad = keep & ((label < 0) | (label >= C))

        # 1. softmax statistics, online over chunks of classes: per-lane max and sum, combined at the end
        mx = tl.sum(tl.zeros([BLOCK], PT), 0)
        inv = mx + 1.0
        if FROM_LOGITS:
            m_l = tl.full([BLOCK], float("-inf"), PT)
            s_l = tl.zeros([BLOCK], PT)
            for start in range(0, C, BLOCK):
                j = start + offs
                v = tl.load(x_row + j * sxc, mask=j < C, other=float("-inf")).to(PT)
                m_new = tl.maximum(m_l, v)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with no finite logit yet: sum 0
                s_l = s_l * tl.exp(m_l - m_safe) + tl.exp(v - m_safe)
                m_l = m_new
            mx = tl.max(m_l, 0)
            inv = 1.0 / tl.sum(s_l * tl.exp(m_l - mx), 0)

        # 2. d = p - q in DFS order, its exclusive prefix sum c -> s1[0 .. n]
        carry = _zero64(BLOCK)
        for start in range(0, n, BLOCK):
            k = start + offs
            inb = k < n
            cls = tl.load(node_class_ptr + k, mask=inb, other=-1)
            has = cls >= 0
            xv = tl.load(x_row + cls * sxc, mask=has, other=0.0).to(PT)
            if FROM_LOGITS:  # noqa: SIM108 - a constexpr branch: only one side is compiled
                p = tl.where(has, tl.exp(xv - mx) * inv, 0.0)
            else:
                p = tl.where(has, xv, 0.0)
            if SOFT:
                q = tl.load(soft_ptr + r64 * ssr + cls * ssc, mask=has, other=0.0).to(PT)
            else:
                q = tl.where(has & (cls == label), 1.0, 0.0).to(PT)
            d = (p - q).to(tl.float64)
            incl = tl.cumsum(d, 0) + carry
            tl.store(s1 + k, incl - d, mask=inb)
            carry += tl.sum(d, 0)
        tl.store(s1 + n, carry)
        tl.debug_barrier()

        # 3. flows from two gathers per edge, the loss, h -> s2
        acc = tl.zeros([BLOCK], tl.float64)
        for start in range(0, n, BLOCK):
            k = start + offs
            inb = k < n
            end = tl.load(node_end_ptr + k, mask=inb, other=0)
            w = tl.load(node_w_ptr + k, mask=inb, other=0.0)
            lo = tl.load(s1 + k, mask=inb, other=0.0, cache_modifier=".cg")
            hi = tl.load(s1 + end, mask=inb, other=0.0, cache_modifier=".cg")
            f = hi - lo
            a = tl.abs(f)
            sgn = tl.where(f > 0, 1.0, tl.where(f < 0, -1.0, 0.0)).to(tl.float64)
            if RHO_KIND == 1:
                acc += w * a
                h = w * sgn
            elif RHO_KIND == 2:
                acc += w * (f * f)
                h = 2.0 * w * f
            else:
                a32 = a.to(tl.float32)
                pw = tl.exp2((rho - 1.0) * tl.log2(tl.where(a32 > 0, a32, 1.0)))  # |f|^(rho-1), f != 0
                ap = tl.where(a32 > 0, pw, 0.0).to(tl.float64)
                acc += w * (a * ap)
                h = rho * w * sgn * ap
            if NEED_GRAD:
                tl.store(s2 + k, h, mask=inb)
        total = tl.sum(acc, 0)
        total = tl.where(keep, total, 0.0)
        total = tl.where(bad, float("nan"), total)
        tl.store(loss_ptr + r64, total.to(PT))

        if NEED_GRAD:
            tl.debug_barrier()
            # 4. prefix sum of h over the edges in end order -> s1[1 .. E2], s1[0] = 0
            tl.store(s1, _zero64(BLOCK))
            carry = _zero64(BLOCK)
            for start in range(0, E2, BLOCK):
                e = start + offs
                inb = e < E2
                k = tl.load(end_order_ptr + e, mask=inb, other=0)
                hv = tl.load(s2 + k, mask=inb, other=0.0, cache_modifier=".cg")
                tl.store(s1 + 1 + e, tl.cumsum(hv, 0) + carry, mask=inb)
                carry += tl.sum(hv, 0)
            tl.debug_barrier()

            # 5. G_j = (prefix sum of h by position) - (prefix sum by end, up to the edges ended by j) -> s2
            carry = _zero64(BLOCK)
            pg = tl.zeros([BLOCK], tl.float64)
            for start in range(0, n, BLOCK):
                k = start + offs
                inb = k < n
                hv = tl.load(s2 + k, mask=inb, other=0.0, cache_modifier=".cg")
                ended = tl.load(ended_ptr + k, mask=inb, other=0)
                h2 = tl.load(s1 + ended, mask=inb, other=0.0, cache_modifier=".cg")
                g = tl.cumsum(hv, 0) + carry - h2
                carry += tl.sum(hv, 0)
                tl.store(s2 + k, g, mask=inb)
                if FROM_LOGITS:
                    cls = tl.load(node_class_ptr + k, mask=inb, other=-1)
                    has = cls >= 0
                    xv = tl.load(x_row + cls * sxc, mask=has, other=0.0).to(PT)
                    p = tl.where(has, tl.exp(xv - mx) * inv, 0.0)
                    pg += p.to(tl.float64) * g
            pgs = tl.sum(pg, 0)
            tl.debug_barrier()

            # 6. the gradient in class order: p_j (G_j - <p, G>) through the softmax, else G_j
            for start in range(0, C, BLOCK):
                j = start + offs
                inb = j < C
                pos = tl.load(class_pos_ptr + j, mask=inb, other=0)
                g = tl.load(s2 + pos, mask=inb, other=0.0, cache_modifier=".cg")
                if FROM_LOGITS:
                    xv = tl.load(x_row + j * sxc, mask=inb, other=0.0).to(PT)
                    p = tl.exp(xv - mx) * inv
                    g = p.to(tl.float64) * (g - pgs)
                g = tl.where(keep, g, 0.0)
                tl.store(grad_ptr + r64 * C + j, g.to(PT), mask=inb)


def block_size(num_nodes: int, num_classes: int) -> int:
    """The chunk size: the next power of two above the row's length, at most :data:`MAX_BLOCK`, at least 16."""
    return max(16, min(MAX_BLOCK, int(triton.next_power_of_2(max(num_nodes + 1, num_classes)))))


def num_programs(rows: int, num_nodes: int, device: torch.device) -> int:
    """Persistent programs: up to 8 per SM (CUDA), within :data:`SCRATCH_BUDGET` of scratch but at least one
    per SM; one per row when there are fewer rows. Under the interpreter programs run one after another, so 1."""
    if rows == 0:
        return 0
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else -1)
    per_program = 16 * (num_nodes + 1)
    return max(1, min(rows, max(sms, min(8 * sms, SCRATCH_BUDGET // per_program))))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index if index >= 0 else torch.cuda.current_device()).multi_processor_count


def launch(
    x: Tensor,
    labels: Tensor | None,
    soft: Tensor | None,
    node_class: Tensor,
    node_end: Tensor,
    node_w: Tensor,
    class_pos: Tensor,
    end_order: Tensor,
    ended: Tensor,
    rho: float,
    from_logits: bool,
    ignore_index: int,
    need_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Run the kernel: (M,) losses and, if ``need_grad``, the (M, C) gradient of each row's loss (else an empty
    (0, C) tensor), both float32 (float64 for float64 ``x``). ``x`` (M, C) rows; ``labels`` (M,) class indices
    or ``soft`` (M, C) distributions (the other None); the tree arrays are :func:`.triton_gpu.tree_arrays`
    on ``x``'s device."""
    m, c = x.shape
    n = node_class.shape[0]
    # classes are gathered along a row: keep that stride 1 (it also keeps every offset within int32)
    x = x if x.stride(1) == 1 else x.contiguous()
    soft = soft if soft is None or soft.stride(1) == 1 else soft.contiguous()
    labels = labels.contiguous() if labels is not None else None
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    loss = torch.empty(m, dtype=out_dtype, device=x.device)
    grad = torch.empty((m if need_grad else 0, c), dtype=out_dtype, device=x.device)
    programs = num_programs(m, n, x.device)
    if programs == 0:
        return loss, grad
    scratch = torch.empty(programs * (2 * n + 2), dtype=torch.float64, device=x.device)
    rho_kind = RHO_ONE if rho == 1.0 else (RHO_TWO if rho == 2.0 else RHO_OTHER)
    is_soft = soft is not None
    tree_rows_kernel[(programs,)](
        x,
        labels if labels is not None else x,  # an unused pointer argument still needs a tensor
        soft if soft is not None else x,
        loss,
        grad if need_grad else loss,
        scratch,
        node_class,
        node_end,
        node_w,
        class_pos,
        end_order,
        ended,
        m,
        c,
        n,
        end_order.shape[0],
        x.stride(0),
        x.stride(1),
        soft.stride(0) if soft is not None else 0,
        soft.stride(1) if soft is not None else 0,
        float(rho),
        int(ignore_index),
        FROM_LOGITS=bool(from_logits),
        SOFT=is_soft,
        RHO_KIND=rho_kind,
        NEED_GRAD=bool(need_grad),
        PT=tl.float64 if x.dtype == torch.float64 else tl.float32,
        BLOCK=block_size(n, c),
        num_warps=4,
    )
    return loss, grad
