"""The CLI's one handler: a user error anywhere in a command is one line and exit status 2, never a traceback."""

from __future__ import annotations

import pytest

from core.errors import UserError
from miniatures.specs import BackendSpecError, parse_backend_spec
from outreach import cli


def _raise(exc: BaseException):  # type: ignore[no-untyped-def]
    def app() -> None:
        raise exc
    return app


def test_a_user_error_is_one_line_and_status_2(monkeypatch, capsys):  # type: ignore[no-untyped-def]
    with pytest.raises(BackendSpecError) as caught:
        parse_backend_spec("nonsense:")
    assert isinstance(caught.value, UserError)
    monkeypatch.setattr(cli, "app", _raise(caught.value))
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli()
    assert exit_.value.code == 2
    printed = capsys.readouterr().err
    assert "Traceback" not in printed and "nonsense" in printed


def test_a_missing_extra_is_named(monkeypatch, capsys):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(cli, "app", _raise(ModuleNotFoundError("No module named 'scipy'", name="scipy")))
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli()
    assert exit_.value.code == 2
    printed = " ".join(capsys.readouterr().err.split())
    assert "'eval' extra" in printed and 'pip install -e ".[eval]"' in printed


def test_torch_missing_says_to_install_the_cpu_wheel_first(monkeypatch, capsys):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(cli, "app", _raise(ModuleNotFoundError("No module named 'torch'", name="torch")))
    with pytest.raises(SystemExit):
        cli.run_cli()
    printed = " ".join(capsys.readouterr().err.split())
    assert "'train' extra" in printed and "torch==2.13.0" in printed


@pytest.mark.parametrize("exc", [RuntimeError("a bug"),
                                 ModuleNotFoundError("No module named 'nothere'", name="nothere")])
def test_anything_else_keeps_its_traceback(monkeypatch, exc):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(cli, "app", _raise(exc))
    with pytest.raises(type(exc)):
        cli.run_cli()


def test_every_user_error_class_of_the_project_is_a_user_error():  # type: ignore[no-untyped-def]
    from finetune.datasets import DatasetFormatError
    from finetune.replay import ReplayError, ReplayInputChangedError
    from finetune.review import ReviewInputError, ReviewNotFoundError
    from graphs.inputs import InputError
    from miniatures.registry import MiniatureInUseError, MiniatureNotFoundError
    from store.engine import StoreError
    from tools.corpus import CorpusError

    for cls in (DatasetFormatError, ReplayError, ReplayInputChangedError, ReviewInputError, ReviewNotFoundError,
                InputError, MiniatureInUseError, MiniatureNotFoundError, StoreError, CorpusError):
        assert issubclass(cls, UserError), cls


@pytest.mark.parametrize("url", ["notaurl", "nosuchdriver://x/y"])
def test_a_store_url_that_cannot_be_used_is_one_line(url, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    from store import StoreError, open_store

    with pytest.raises(StoreError, match="cannot be used"):
        open_store(url)
    monkeypatch.setattr("sys.argv", ["outreach", "traces", "list", "--store", url])
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli()
    assert exit_.value.code == 2
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err + printed.out and url in printed.err + printed.out
