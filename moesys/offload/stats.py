"""Offload statistics: cache hits, prefetch accuracy, bytes copied, time waiting on copies, tokens/s."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class OffloadStats:
    hits: int = 0              # needed experts found resident (prefetched ones included)
    misses: int = 0            # needed experts that had to be loaded or were computed on the CPU
    prefetch_guessed: int = 0  # experts guessed for the next layer
    prefetch_used: int = 0     # guesses the next layer actually used
    prefetch_copies: int = 0   # guesses that were not resident and were copied
    copies: int = 0            # expert copies host -> device (demand + prefetch)
    bytes_copied: int = 0
    copy_wait_s: float = 0.0   # host time blocked waiting for copies the compute needed (engine.copy_wait 'host')
    cpu_experts: int = 0       # experts computed on the CPU instead of copied
    evictions: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    resident: bool = False     # the budget held every expert: loaded once, the engine left the forward

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else (1.0 if self.resident else 0.0)

    @property
    def prefetch_accuracy(self) -> float:
        return self.prefetch_used / self.prefetch_guessed if self.prefetch_guessed else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, prefetch_accuracy=self.prefetch_accuracy,
                 prefill_tokens_per_s=self.prefill_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s)
        return d

    def summary(self) -> str:
        if self.resident:
            return (f"hit rate {self.hit_rate:.1%} (every expert resident, loaded once: "
                    f"{self.bytes_copied / 2**30:.2f} GiB) | "
                    f"prefill {self.prefill_tokens_per_s:.1f} tok/s | decode {self.decode_tokens_per_s:.2f} tok/s")
        # the graph decode guesses nothing (its copies are in order on the compute stream)
        prefetch = f"{self.prefetch_accuracy:.1%}" if self.prefetch_guessed else "n/a (no guesses)"
        return (f"hit rate {self.hit_rate:.1%} | prefetch accuracy {prefetch} | "
                f"copied {self.bytes_copied / 2**30:.2f} GiB in {self.copies} copies | "
                f"waited {self.copy_wait_s:.2f} s on copies | cpu experts {self.cpu_experts} | "
                f"prefill {self.prefill_tokens_per_s:.1f} tok/s | decode {self.decode_tokens_per_s:.2f} tok/s")
