# %% [markdown]
# # fedsim walkthrough: a run, its metrics, private against non-private, the report
#
# Notebook-style (`# %%` cells: VS Code, Jupyter with jupytext, or `python examples/walkthrough.py`).
# Sizes come from the environment so a test can shrink them:
# FEDSIM_EXAMPLE_ROUNDS (default 20), FEDSIM_EXAMPLE_POPULATION (default 500),
# FEDSIM_EXAMPLE_DIR (default: a new temporary directory),
# FEDSIM_EXAMPLE_OVERRIDES (more overrides, space-separated, e.g. simulation.ray_temp_dir=/tmp/ray).

# %%
import os
import tempfile
from pathlib import Path

import fedsim

ROUNDS = int(os.environ.get("FEDSIM_EXAMPLE_ROUNDS", "20"))
POPULATION = int(os.environ.get("FEDSIM_EXAMPLE_POPULATION", "500"))
ROOT = Path(os.environ.get("FEDSIM_EXAMPLE_DIR") or tempfile.mkdtemp(prefix="fedsim-walkthrough-"))
EXTRA = os.environ.get("FEDSIM_EXAMPLE_OVERRIDES", "").split()
common = [f"rounds={ROUNDS}", f"population={POPULATION}", "cohort.size=20", "simulation.num_workers=1",
          "output.progress=false", *EXTRA]  # fmt: skip

# %% [markdown]
# ## 1. A non-private run: FedAvg on the LEAF synthetic dataset
# `fedsim.simulate` takes the same overrides as the command line and returns the results.

# %%
plain = fedsim.simulate(common, output_dir=ROOT / "non_private")
print(f"non-private: final test accuracy {plain.summary['final_test_accuracy']:.4f} after {plain.summary['rounds']} rounds")

# %% [markdown]
# ## 2. The per-round metrics
# One record per round (metrics.jsonl); as a DataFrame if pandas is installed.

# %%
try:
    frame = plain.dataframe()
    print(frame[["round", "test_accuracy", "train_loss"]].dropna().tail().to_string(index=False))
except ImportError:
    for record in plain.metrics[-5:]:
        print({k: record.get(k) for k in ("round", "test_accuracy", "train_loss")})

# %% [markdown]
# ## 3. The same run with DP-SGD on every device
# Sigma is calibrated so that no device spends more than epsilon = 8 (delta = 1e-5) over the
# run: a sample-level guarantee for each device's examples, not for whole devices.

# %%
private = fedsim.simulate([*common, "privacy=dpsgd_target", "privacy.dpsgd.target_epsilon=8"],
                          output_dir=ROOT / "dpsgd_eps8")  # fmt: skip
sample = private.summary["privacy"]["sample_level"]
print(f"DP-SGD:      final test accuracy {private.summary['final_test_accuracy']:.4f}, "
      f"per-device epsilon max {sample['epsilon_max']:.3f} (median {sample['epsilon_median']:.3f})")  # fmt: skip
print(f"cost of privacy: {plain.summary['final_test_accuracy'] - private.summary['final_test_accuracy']:+.4f} accuracy")

# %% [markdown]
# ## 4. The report: both runs side by side (table, accuracy and epsilon plots, config differences)

# %%
from analysis import write_report  # noqa: E402

report = write_report(ROOT)
print(f"report: {report}")
print(f"(and {report.with_suffix('.html')}, plots and table.csv beside it)")
