"""Which layers stay attention in each stage of a run.

- one stage: ``attention=0.5`` (or explicit indices);
- progressive (paper section 2): ``schedule="0.5,0.25,0.125"``, each stage converting more
  layers, initialised from the previous stage's attention weights;
- stepwise: ``schedule="stepwise:0.25"`` starts at ``attention`` and converts one more layer per
  stage until the 0.25 placement is reached (latest-converted layers first in the paper's
  interleaved order: the layers the target placement drops, from the first one up).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..convert import attention_layers_for


@dataclass(frozen=True)
class Stage:
    index: int
    attn_layers: list[int]
    num_layers: int

    @property
    def label(self) -> str:
        return f"attn{round(100 * len(self.attn_layers) / self.num_layers)}pct-{len(self.attn_layers)}of{self.num_layers}"


def parse_fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"schedule entries are fractions in [0, 1] such as 0.25, got {text!r}") from None


def plan_stages(num_layers: int, attention, schedule: str | None = None) -> list[Stage]:
    first = attention_layers_for(num_layers, attention)
    sets = [first]
    if schedule:
        schedule = schedule.strip()
        if schedule.startswith("stepwise:"):
            target = attention_layers_for(num_layers, parse_fraction(schedule.split(":", 1)[1]))
            extra = set(target) - set(first)
            if extra:
                raise ValueError(f"stepwise target keeps layers {sorted(extra)} that the first stage already converted")
            current = list(first)
            for layer in [i for i in first if i not in target]:
                current = [i for i in current if i != layer]
                sets.append(list(current))
        else:
            fractions = [parse_fraction(part) for part in schedule.split(",") if part.strip()]
            planned = [attention_layers_for(num_layers, f) for f in fractions]
            if planned and planned[0] == first:
                planned = planned[1:]  # the schedule may restate the first stage
            sets.extend(planned)
    for a, b in zip(sets, sets[1:]):
        if not set(b) <= set(a):
            raise ValueError(
                f"a schedule can only convert more layers: stage keeping {b} does not follow one keeping {a}"
            )
        if a == b:
            raise ValueError(f"schedule repeats the same attention layers {a}")
    return [Stage(i, layers, num_layers) for i, layers in enumerate(sets)]


__all__ = ["Stage", "parse_fraction", "plan_stages"]
