import pytest

from convserve import models
from convserve.cli import main
from convserve.models._registry import task_of
from convserve.models.summary import summarize

# The seed's LeNet-5 table: input 32x32x3, 8 then 16 filters of 5x5, FC 120 / 84 / 10.
SEED_TABLE = [
    ("CONV1", "(28,28,8)", 6272, 608),
    ("POOL1", "(14,14,8)", 1568, 0),
    ("CONV2", "(10,10,16)", 1600, 3216),
    ("POOL2", "(5,5,16)", 400, 0),
    ("FC3", "120", 120, 48120),
    ("FC4", "84", 84, 10164),
    ("softmax", "10", 10, 850),
]


def test_seed_table():
    model = models.create_model("lenet5", in_channels=3, input_size=32, filters=(8, 16))
    rows = summarize(model, in_channels=3, input_size=32)
    assert rows[0].name == "INPUT" and rows[0].shape_text == "(32,32,3)"
    assert [(r.name, r.shape_text, r.size, r.params) for r in rows[1:]] == SEED_TABLE
    assert sum(r.params for r in rows) == sum(p.numel() for p in model.parameters())


def test_summary_command_prints_the_seed_table(capsys: pytest.CaptureFixture[str]):
    assert (
        main(
            [
                "summary",
                "lenet5",
                "--in-channels",
                "3",
                "--input-size",
                "32",
                "--arg",
                "filters=[8,16]",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    for name, shape, size, params in SEED_TABLE:
        (line,) = [ln for ln in lines if ln.split()[:1] == [name]]
        assert line.split() == [name, shape, str(size), str(params)]
    assert lines[-1].split() == ["total", "62958"]


@pytest.mark.parametrize("name", [n for n in models.list_models() if task_of(n) == "classify"])
def test_summary_covers_every_model(name: str):
    model = models.create_model(name, in_channels=1, input_size=28, num_classes=10)
    rows = summarize(model, in_channels=1, input_size=28)
    assert rows[-1].size == 10  # the classifier's output


@pytest.mark.parametrize(
    ("name", "size", "last"), [("yolo_fashion", 128, 8 * 8 * 3 * 15), ("siamese_fashion", 28, 128)]
)
def test_summary_covers_the_detector_and_the_embedding_network(name: str, size: int, last: int):
    rows = summarize(models.create_model(name), in_channels=1, input_size=size)
    assert rows and rows[-1].size == last  # the raw grid, the embedding


def test_version_and_the_bench_command_reach_their_programs(capsys):
    import pytest

    from convserve import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"convserve {__version__}"
    with pytest.raises(SystemExit) as done:
        main(["bench", "--help"])  # every option after `bench` is the harness's
    out = capsys.readouterr().out
    assert done.value.code == 0 and "usage: convserve bench" in out and "--quick" in out
