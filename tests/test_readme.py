"""The README's Python examples run as written (in order, sharing one namespace)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 5, "expected the README's usage examples"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    # spot-check what the examples promise
    assert namespace["result"].particles.shape == (50, 2)
    assert namespace["result"].trace.weights.shape == (5, 3)
    assert int(namespace["result"].nonfinite.steps) == 0
    state, info = namespace["sampler_state"], namespace["info"]
    assert state.particles.shape == (50, 2)
    assert info.log_prob.shape == (3, 50) and int(info.nonfinite) == 0
    assert namespace["res"].particles.shape[0] == 256  # the sharded example ran last
    assert namespace["params"]["kernel"].shape == (8, 4, 3)
    x, _ = namespace["step"](namespace["particles"], namespace["state"])
    assert x.shape == (50, 2)
