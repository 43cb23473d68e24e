"""Every key of every row does something: some code reads it.

The reads of the typed sections are recorded while a tiny run of each family trains and evaluates
(the GPT run with a batch ramp), and while `jaxgen configs show` prints every row. Reads that only
check, copy, compare or print a section do not count. Model and data keys must be read for their
own family; the shared sections (optim, train, mesh) by any family. `meta` never changes a run.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest

from jaxgen import config as config_lib
from jaxgen.tools import catalog
from jaxgen.train import loop
from tests.tiny_runs import tiny_config

# Frames that touch every field without using it: a section checking, copying or printing itself,
# dataclasses' generated methods and helpers.
NOT_USE = {"check", "to_dict", "__post_init__", "__eq__", "__hash__", "__repr__", "keys"}
COMPREHENSIONS = {"<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>"}
RAMP = ["mesh.data=2", "mesh.tensor=4", "train.batch_ramp_start_tokens=64",
        "train.batch_ramp_tokens=128", "train.batch_ramp_stages=2"]  # fmt: skip
RUNS = {"bert": [], "gpt": RAMP, "t5": []}


class Recorder:
    """Records (family, section, key) for each read of a typed section's field."""

    def __init__(self) -> None:
        self.reads: set[tuple[str, str, str]] = set()
        self.family = ""

    def getattribute(self, section: config_lib.Section, name: str):
        value = object.__getattribute__(section, name)
        fields = object.__getattribute__(type(section), "__dataclass_fields__")
        if name in fields:
            caller = sys._getframe(1)
            while caller.f_code.co_name in COMPREHENSIONS:  # the function the loop is in
                caller = caller.f_back
            code = caller.f_code
            generated = code.co_filename in ("<string>", dataclasses.__file__)
            own = code.co_name in NOT_USE and caller.f_locals.get("self") is section
            if not (generated or own):
                self.reads.add((self.family, type(section).SECTION, name))
        return value


@pytest.fixture(scope="module")
def reads(tmp_path_factory):
    recorder = Recorder()
    patch = pytest.MonkeyPatch()
    patch.setattr(
        config_lib.Section,
        "__getattribute__",
        lambda section, name: recorder.getattribute(section, name),
        raising=False,
    )
    catalog._abstract_params_cached.cache_clear()  # traced models must be traced again here
    cache = tmp_path_factory.mktemp("keys_cache")
    try:
        for family, extra in RUNS.items():
            recorder.family = family
            overrides = ["train.num_steps=2", "train.eval_every=2", *extra]
            loop.train(tiny_config(family, cache, *overrides), tmp_path_factory.mktemp(family))
            for name in catalog.list_names(family):
                catalog.show_config(name)
    finally:
        patch.undo()
        catalog._abstract_params_cached.cache_clear()
    return recorder.reads


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
def test_every_key_of_every_row_is_read(family, reads):
    shared = {(section, key) for _, section, key in reads}
    own = {(section, key) for f, section, key in reads if f == family}
    unread = set()
    for name in catalog.list_names(family):
        for key in config_lib.flat_keys(catalog.load_row(name)):
            section, _, leaf = key.partition(".")
            if section == "meta":
                continue
            seen = own if section in ("model", "data") else shared
            if (section, leaf) not in seen:
                unread.add(f"{name}: {key}")
    assert not unread, sorted(unread)
