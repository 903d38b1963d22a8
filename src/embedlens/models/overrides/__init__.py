"""The small per-architecture facts the generic adapter cannot know.

The generic path (`embedlens.models.adapter`) finds visual tokens as `input_ids ==
image_token_id`, reads decoder hidden states from `output_hidden_states`, and captures the
vision encoder's layers with hooks. What it cannot know from the transformers API is *where*
each visual token sits in the image, how the vision tower's (packed) outputs split per image,
and which vision-encoder token feeds which LLM token. Those facts live here, one module per
architecture family (`base` has the conventions and the generic defaults), each registering
its classes under the config's `model_type`. Users add an architecture without editing the
package with `register_overrides` (see `base.register_overrides`).
"""

from .base import (  # noqa: F401 - the public API
    ArchOverrides,
    ImageContext,
    TokenLayout,
    get_overrides,
    known_architectures,
    load_user_overrides,
    register_overrides,
    unknown_layout,
)
from . import gemma, idefics, llava, qwen  # noqa: F401,E402 - each registers its architectures
from . import aya_vision, internvl, mistral3  # noqa: F401,E402 - LLaVA-style families (tiles, Pixtral)
from . import glm4v  # noqa: F401,E402 - GLM-4V (after qwen: it extends the Qwen2-VL overrides)
