"""The Explain lab: experiments that show why diffusion takes many small steps, built on generate().

Every experiment is a generator over one frozen report that grows: it yields after each generate() call, so a UI
can stream partial results and stop between runs (and `cancelled` stops a run in flight at a step boundary;
`run_seconds` bounds each of its runs: one that runs out stops at its next step and the experiment raises a
ValueError saying so, after the reports it yielded).
`finish(experiment)` runs one to the end, as the CLI does. No second denoising loop: all steps come from
generate() and its StepEvents.

- jump: per step, the decoded x̂0 ("jump now") against the final image ("keep walking"), its sharpness and its
  distance to the final image, plus separate k-step runs ("take k big steps").
- branch: one trunk run to a fraction f of the schedule, finished N times with different noise draws
  (GenerationRequest.branch); diversity of the N endings against f.
- sweep: a grid over one or two of guidance_scale, steps, scheduler, guidance (method), seed; matched seeds.
- dissect: one run's conditional, unconditional and guided x̂0 per step, ‖ε_c − ε_u‖, the effective scale and
  how much x̂0 still moves.
- tradeoff: for a few guidance scales, N seeds each: prompt adherence (the shapes world's judge, embedded model
  only) and diversity.
- attention: which word drew where: per-word cross-attention maps of one run (pipelines/attention.py), per step
  and for the whole run, over x̂0 and over the final image.
- layout: when is the layout decided: the prompt's one [from:to:when] switched at several points of the
  schedule, the same seed(s) in every column, each image read by the shapes world's judge (embedded model only).

Every report has to_dict() (its numbers, JSON-ready: what the UI's JSON panel and the API return) and write(out)
(its images, its picture from figures.py and OUT/<experiment>.json: to_dict() plus the image paths; the CLI's files).

Distances are RMS over RGB pixels in [0, 1]; sharpness is the mean squared Laplacian of the luminance in [0, 1]
(high-frequency energy: a blurry average has little, crisp edges a lot).
"""

from pipelines.explain.attention import (AttentionReport, AttentionStep, attention, attention_maps, heat_over,
                                        object_mask)
from pipelines.explain.branch import BranchPoint, BranchReport, branch, branch_seed
from pipelines.explain.common import MAX_CELLS, MAX_RUNS, Cancelled, finish, seeded, _X0
from pipelines.explain.dissect import DissectReport, DissectStep, dissect
from pipelines.explain.jump import JumpReport, JumpStep, ShortRun, frame_steps, jump, kept_steps, nearest_kept
from pipelines.explain.layout import (SWITCH_POINTS, LayoutCell, LayoutReport, judge_changes, layout, parse_points,
                                     when_text)
from pipelines.explain.metrics import diversity, pixels, rms, sharpness
from pipelines.explain.sweep import AXES, Axis, SweepCell, SweepReport, parse_axis, sweep
from pipelines.explain.tradeoff import TradeoffPoint, TradeoffReport, check_judge_model, judge_targets, tradeoff

__all__ = ["SWITCH_POINTS", "LayoutCell", "LayoutReport", "judge_changes", "layout", "parse_points", "when_text",
           "AttentionReport", "AttentionStep", "attention", "attention_maps", "heat_over", "object_mask",
           "AXES", "Axis", "BranchPoint", "BranchReport", "Cancelled", "DissectReport", "DissectStep", "JumpReport",
           "JumpStep", "MAX_CELLS", "MAX_RUNS", "ShortRun", "SweepCell", "SweepReport", "TradeoffPoint",
           "TradeoffReport", "branch", "branch_seed", "check_judge_model", "dissect", "diversity", "finish",
           "frame_steps", "judge_targets", "jump", "kept_steps", "nearest_kept", "parse_axis", "pixels", "rms",
           "seeded", "sharpness", "sweep", "tradeoff", "_X0"]
