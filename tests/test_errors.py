"""tinygpt.errors: a UserError is one `error:` line and exit status 2, also when a torch DataLoader worker raised it
(torch re-raises it with the worker's whole traceback in its message)."""

from __future__ import annotations

import pytest
import torch

from tinygpt.errors import USER_ERROR_EXIT_CODE, UserError, report_errors


class _Refusing(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise UserError("data/mine.jsonl line 3: image cats/1.jpg does not exist")


def test_a_user_error_from_a_dataloader_worker_is_one_line(capsys):
    def load():
        next(iter(torch.utils.data.DataLoader(_Refusing(), num_workers=1)))

    with pytest.raises(UserError, match="Original Traceback"):  # what torch hands back
        load()
    assert report_errors(load) == USER_ERROR_EXIT_CODE
    assert capsys.readouterr().err == "error: data/mine.jsonl line 3: image cats/1.jpg does not exist\n"


def test_a_plain_user_error_is_printed_as_it_is(capsys):
    def fail():
        raise UserError("stage1.yaml: run.seed: must be an integer, got 'x'")

    assert report_errors(fail) == USER_ERROR_EXIT_CODE
    assert capsys.readouterr().err == "error: stage1.yaml: run.seed: must be an integer, got 'x'\n"
