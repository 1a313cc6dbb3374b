"""A trainer's ``main`` as a process: one exit code per outcome, shared by every trainer, so that
``beit3.runtime.supervise`` treats pretraining, tokenizer training and fine-tuning alike.

0 done; 2 a configuration error (one line, no traceback); 3 the divergence guard gave up; 5 the
last checkpoint could not be written for lack of space; 1 any other error (traceback). The
supervisor restarts only 1 and the exits of killed or hung ranks.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable

from beit3.model.config import ConfigError

from .checkpointing import EXIT_NO_SPACE, UnsavedError
from .guard import EXIT_DIVERGED, DivergenceError

EXIT_CONFIG = 2


def run_main(main: Callable[[list[str]], Any], argv: list[str]) -> int:
    """``main(argv)``; the exit code of its outcome."""
    first = os.environ.get("RANK", "0") == "0"  # every rank agrees on these outcomes; one line for the job
    try:
        main(argv)
    except ConfigError as e:  # a wrong configuration: one clear line, no traceback
        print(f"configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except UnsavedError as e:  # a full disk at the last save: one line; the supervisor does not restart
        if first:
            print(f"checkpoint not saved: {e}", file=sys.stderr)
        return EXIT_NO_SPACE if e.no_space else 1
    except DivergenceError as e:  # the guard gave up: one clear line; the supervisor does not restart
        if first:
            print(f"diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except Exception:  # noqa: BLE001 - printed; the caller exits with the code (bounded: exit_within)
        traceback.print_exc()
        return 1
    return 0


__all__ = ["run_main", "EXIT_CONFIG"]
