"""The one exception type for bad input.

Anything the user can fix (a missing file, a shape mismatch, a bad parameter) raises
MergeInputError with a one-paragraph message that names the file, the tensor and the
models involved and says what to do. The CLI prints it and exits with status 2, without
a traceback. Bugs stay ordinary exceptions, so they keep their tracebacks.
"""

EXIT_BAD_INPUT = 2


class MergeInputError(Exception):
    """Bad input the user can fix; `str(err)` is the whole message shown to them."""


class OutputWriteError(MergeInputError):
    """Writing the output failed (a full disk, a removed directory): the partial output and its
    journal stay for --resume, which keeps finished shards and the statistics passes' results."""


def listing(prefix: str, problems: list[str], what: str = "problems") -> MergeInputError:
    """One paragraph for several problems (numbered; one alone reads as itself), each kept in
    `.problems` so a caller that finds more can list them all together. A problem found twice
    (one key read by two parts) is listed once."""
    problems = list(dict.fromkeys(problems))
    if len(problems) == 1:
        err = MergeInputError(f"{prefix}{problems[0]}.")
    else:
        err = MergeInputError(f"{prefix}{len(problems)} {what}: "
                              + "; ".join(f"({i + 1}) {p}" for i, p in enumerate(problems)) + ".")
    err.problems = list(problems)
    return err


class NonFiniteInput(Exception):
    """A backend met NaN or Inf in an input tensor (model_index -1 is the base).

    Backends know tensors, not files; the engine turns this into a MergeInputError that
    names the file and the model.
    """

    def __init__(self, name: str, model_index: int):
        super().__init__(f"non-finite values in tensor {name} of input {model_index}")
        self.name = name
        self.model_index = model_index
