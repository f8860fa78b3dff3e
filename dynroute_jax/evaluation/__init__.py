"""Evaluation of a routed model over a dataset: accuracy and executed cost per example.

Evaluation is deterministic: no Gumbel noise, the router softmax at the temperature training ended
with (recorded in the report as `eval_tau`), batch norm on running statistics. "All" means every
branch/block runs; "routed" uses the config's threshold (`config.eval.threshold`).

Costs are MACs per example (FLOPs = 2 x MACs), counted from the branches/blocks that actually run
for that example (`ModelOutput.executed_macs`), routers and fixed parts included.

Threshold semantics differ between the models: DRNet keeps, per connection, the fewest largest branch
weights reaching T (more is kept as T grows, T = 1 keeps every branch with positive weight); CoDiNet
runs a block iff its run probability v >= T (less runs as T grows). Every function here works for
both; the budget search (`choose_threshold`) does not assume either direction.

Modules:
  * `predict`: the checked, jitted predictor and the batched pass over a dataset (`Passes`);
  * `metrics`: accuracy, MACs and path statistics of one pass (`summarize`);
  * `budget`: the threshold meeting a MACs budget on a calibration split;
  * `instance`: instance awareness (confidence split, clean vs noisy inputs);
  * `static`: the static counterpart of equal cost;
  * `table`: the printed table;
  * `report`: `evaluate_and_report`, which runs them all and writes `eval/report.json`, and
    `evaluate_headline`, its headline numbers alone (the periodic evaluation in training).
"""

from dynroute_jax.config_lib import check_threshold
from dynroute_jax.evaluation.budget import BudgetRequest
from dynroute_jax.evaluation.budget import check_target_macs
from dynroute_jax.evaluation.budget import choose_threshold
from dynroute_jax.evaluation.budget import MIN_THRESHOLD
from dynroute_jax.evaluation.instance import CONFIDENCE_LEVEL
from dynroute_jax.evaluation.instance import confidence_split
from dynroute_jax.evaluation.instance import DEFAULT_NOISE_STDS
from dynroute_jax.evaluation.instance import noise_comparison
from dynroute_jax.evaluation.metrics import summarize
from dynroute_jax.evaluation.predict import check_images
from dynroute_jax.evaluation.predict import DEFAULT_KEEP
from dynroute_jax.evaluation.predict import image_shape
from dynroute_jax.evaluation.predict import make_passes
from dynroute_jax.evaluation.predict import make_predict_fn
from dynroute_jax.evaluation.predict import NOISE_SEED
from dynroute_jax.evaluation.predict import Passes
from dynroute_jax.evaluation.predict import Predictor
from dynroute_jax.evaluation.predict import run_dataset
from dynroute_jax.evaluation.report import evaluate_and_report
from dynroute_jax.evaluation.report import evaluate_headline
from dynroute_jax.evaluation.report import ReportOptions
from dynroute_jax.evaluation.static import MAX_EXHAUSTIVE_BLOCKS
from dynroute_jax.evaluation.static import static_counterpart
from dynroute_jax.evaluation.table import format_table
