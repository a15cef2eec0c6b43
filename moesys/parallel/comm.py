"""Collectives for expert parallelism: error context, and differentiable (async) all-to-all.

Every collective goes through `guarded`, which re-raises a failure (a timeout, a dead peer, a
shape mismatch) as `CollectiveError` naming this rank, the layer and the operation, so that a job
ends with a message saying where it stopped instead of hanging or dying with a bare gloo/NCCL error.

The all-to-all comes in two halves so that computation can run while rows are in flight:
`start = AllToAllStart.apply(x, ...)` launches it (async_op=True) and returns the receive buffer,
`y = AllToAllWait.apply(start, ...)` waits. Their backward is the reverse all-to-all, split the
same way: the wait's backward launches it and the start's backward waits, so the autograd engine
runs whatever backward work was recorded between the two (e.g. the shared expert) meanwhile.

Legend: N rows sent, R rows received, H hidden.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["CollectiveError", "CommContext", "guarded", "exchange_counts", "all_to_all", "all_to_all_async"]


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the rank, the layer and the operation."""


class CommContext:
    """What a layer's collectives need: the group, who we are (for messages) and the wait timeout."""

    def __init__(self, group, *, rank: int, group_size: int, layer: str | None, timeout: timedelta | None = None):
        self.group, self.rank, self.group_size, self.layer, self.timeout = group, rank, group_size, layer, timeout


_RESET = ("connection reset", "closed by peer", "connection closed", "broken pipe", "connection refused")


def describe_failure(error: Exception, timeout: timedelta | None) -> str:
    """What a failed collective's error means: a reset (a peer process died) or a timeout (a peer is
    stuck, dead on another host, or in another collective)."""
    text = str(error).lower()
    if any(s in text for s in _RESET):
        return "the connection to a peer was reset: a peer process died"
    limit = f" after {timeout.total_seconds():g}s (parallel.timeout_s)" if timeout is not None else ""
    if "timed out" in text or "timeout" in text:
        return f"timed out{limit}: a peer rank is stuck or dead, or issued different collectives"
    return "a peer rank is dead, stuck, or issued different collectives"


@contextmanager
def guarded(ctx: CommContext, what: str):
    try:
        yield
    except CollectiveError:
        raise
    except (RuntimeError, ValueError) as e:
        timeout = f" (timeout {ctx.timeout.total_seconds():g}s)" if ctx.timeout is not None else ""
        where = f" in layer {ctx.layer!r}" if ctx.layer else ""
        raise CollectiveError(f"rank {ctx.rank}: {what}{where} failed{timeout}: "
                              f"{describe_failure(e, ctx.timeout)}. Cause: {e}") from e


def wait_work(work, ctx: CommContext, what: str, host_sync: bool = True) -> None:
    """Wait for `work`, failing after ctx.timeout. On CUDA a wait with a timeout blocks the host until
    the kernel finishes, so transfers the host need not see (`host_sync=False`) wait on the stream
    only and leave stuck peers to NCCL's watchdog and the group's timeout; the count exchange, which
    the host reads anyway and which every layer issues first, is where a stuck peer gets named."""
    if work is None:
        return
    with guarded(ctx, what):
        if ctx.timeout is not None and host_sync:
            work.wait(ctx.timeout)
        else:
            work.wait()


def exchange_counts(counts_send_RE: torch.Tensor, ctx: CommContext) -> torch.Tensor:
    """counts_send_RE[r, e] = rows this rank sends to rank r's local expert e; returns what each rank
    sends us, [R=ep, E_local]. Every rank calls this even with zero tokens: the counts are what lets
    everybody agree on the splits of the token all-to-all that follows."""
    recv_RE = torch.empty_like(counts_send_RE)
    with guarded(ctx, "token-count all-to-all"):
        work = dist.all_to_all_single(recv_RE.view(-1), counts_send_RE.contiguous().view(-1),
                                      group=ctx.group, async_op=True)
    wait_work(work, ctx, "token-count all-to-all")
    return recv_RE


class _Ticket:
    """The in-flight work shared by a start/wait pair (forward and backward)."""
    __slots__ = ("work", "buffer")

    def __init__(self):
        self.work, self.buffer = None, None


def _launch(out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, ctx: CommContext, what: str):
    with guarded(ctx, what):
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=ctx.group, async_op=True)


class AllToAllStart(torch.autograd.Function):
    """Launch an all-to-all of rows with variable splits; returns the (not yet filled) receive buffer."""

    @staticmethod
    def forward(fctx, x_NH, out_splits, in_splits, ctx: CommContext, ticket: _Ticket, what: str):
        x_NH = x_NH.contiguous()
        out_RH = x_NH.new_empty((sum(out_splits),) + tuple(x_NH.shape[1:]))
        ticket.work = _launch(out_RH, x_NH, out_splits, in_splits, ctx, what)
        ticket.buffer = x_NH  # kept alive until the wait: the backend reads it while in flight
        fctx.ctx, fctx.ticket, fctx.what = ctx, ticket, what
        return out_RH

    @staticmethod
    def backward(fctx, grad_unused):
        ticket = fctx.ticket
        # AllToAllWait.backward launched the reverse all-to-all into ticket.buffer; finish it here.
        wait_work(ticket.work, fctx.ctx, f"{fctx.what} (backward)", host_sync=not ticket.buffer.is_cuda)
        grad_NH, ticket.work, ticket.buffer = ticket.buffer, None, None
        return grad_NH, None, None, None, None, None


class AllToAllWait(torch.autograd.Function):
    """Wait for the matching AllToAllStart; identity on the buffer."""

    @staticmethod
    def forward(fctx, out_RH, x_shape, out_splits, in_splits, ctx: CommContext, ticket: _Ticket, what: str):
        wait_work(ticket.work, ctx, what, host_sync=not out_RH.is_cuda)
        ticket.work, ticket.buffer = None, None
        fctx.x_shape, fctx.splits = x_shape, (out_splits, in_splits)
        fctx.ctx, fctx.ticket, fctx.what = ctx, ticket, what
        return out_RH.view_as(out_RH)

    @staticmethod
    def backward(fctx, grad_RH):
        out_splits, in_splits = fctx.splits
        grad_RH = grad_RH.contiguous()
        ticket = fctx.ticket
        ticket.buffer = grad_RH.new_empty(fctx.x_shape)
        ticket.work = _launch(ticket.buffer, grad_RH, in_splits, out_splits, fctx.ctx, f"{fctx.what} (backward)")
        # The real gradient travels through the ticket; the start's backward ignores this one.
        return grad_RH, None, None, None, None, None, None


class Pending:
    """An all-to-all in flight: `wait()` returns the received rows (differentiable)."""

    def __init__(self, out_RH, args):
        self._out_RH, self._args = out_RH, args

    def wait(self) -> torch.Tensor:
        return AllToAllWait.apply(self._out_RH, *self._args)


def all_to_all_async(x_NH: torch.Tensor, out_splits: list[int], in_splits: list[int], ctx: CommContext,
                     what: str) -> Pending:
    """Send rows x_NH[in_splits[r] block] to rank r, receive out_splits[r] rows from rank r.

    Differentiable in x_NH; the backward is the reverse all-to-all. Run other work between this
    call and `.wait()` to overlap it with the transfer (in forward and, mirrored, in backward)."""
    ticket = _Ticket()
    out_splits, in_splits = [int(s) for s in out_splits], [int(s) for s in in_splits]
    out_RH = AllToAllStart.apply(x_NH, out_splits, in_splits, ctx, ticket, what)
    return Pending(out_RH, (tuple(x_NH.shape), out_splits, in_splits, ctx, ticket, what))


def all_to_all(x_NH: torch.Tensor, out_splits: list[int], in_splits: list[int], ctx: CommContext,
               what: str) -> torch.Tensor:
    """The blocking form of `all_to_all_async`."""
    return all_to_all_async(x_NH, out_splits, in_splits, ctx, what).wait()
