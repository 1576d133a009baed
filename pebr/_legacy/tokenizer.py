"""`pebr.tokenizer` before the recipe layer moved into packages: its names, from their new homes."""
from pebr.data.tasks import task_corpus as default_corpus  # noqa: F401
from pebr.model.tokenizer import *  # noqa: F401,F403
from pebr.model.tokenizer import (  # noqa: F401
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_tokenizer,
    special_ids,
)
