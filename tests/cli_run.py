"""Running the CLI in process for the hostile-input tests: the command as a user types it, and the
one-line refusal the README promises."""


def cli(*argv):
    """(exit code, stdout, stderr, an exception other than exit)."""
    from typer.testing import CliRunner

    from cli import app

    r = CliRunner().invoke(app, [str(a) for a in argv])
    exc = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
    return r.exit_code, r.stdout, r.stderr, exc


def build(inp, out, *more):
    """A tiny `build-shards` (no workers, 16 px slices, a third of the patients for validation)."""
    return cli("build-shards", inp, out, "--workers", "0", "--size", "16", "--quiet", "--val-fraction", "0.34", *more)


def refused(r, *names) -> str:
    """`r` (from `cli`) is exit 2 with exactly one `error:` line naming each of `names`; that line."""
    code, out, err, exc = r
    assert exc is None, exc
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in names:
        assert str(n) in err, (n, err)
    return err
