"""Jobs as recipes (torchtune's shape): a config in, named setup steps, the training loop,
evaluation and saving as steps of their own. `spalora train` builds a `FinetuneConfig` and runs
`FinetuneRecipe`."""

from .finetune import FinetuneConfig, FinetuneRecipe
from .output import JobError

__all__ = ["FinetuneConfig", "FinetuneRecipe", "JobError"]
