"""The README's code runs: every ```python block as written, every shell command with reduced sizes on tiny data
(or listed in NOT_RUN with the reason). They run in order in one fresh folder, as a new user would run them:
the demo's files are there when a block loads them. The benches, named inline in the text, take minutes to hours:
bench/README.md says how to run each."""
import importlib.util
import re
import shlex
import shutil
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from torch.utils.data import Subset

import cdp_gfi.data.datasets as datasets
from cdp_gfi import build_model
from cdp_gfi.flops import main as flops_main
from cdp_gfi.runs import cifar_steps

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

# Commands a test does not run, by their first words, and why.
NOT_RUN = {
    "pip install": "installs packages from the network; CI (.ci/run) does it in a fresh environment",
    "python -m pytest": "the test suite itself",
    "python examples/nni_experiment/run_experiment.py": "six NNI trials in their own processes (minutes); "
                                                        "tests/test_nni_experiment.py runs the experiment with three",
    "nnictl create": "starts NNI's web service and six trials; tests/test_nni_experiment.py checks config.yml",
}
# Tiny sizes appended to each script's command (the last value of a flag wins), one process, no loader workers.
TINY = {"prune_cifar.py": ["--epochs", "1", "--baseline_epochs", "1", "--stop_batch", "2", "--bn_recalibrate", "1"],
        "statistic_imagenet.py": ["--stop_batch", "2", "--batch_size", "8", "--input_size", "32",
                                  "--bn_recalibrate", "1"],
        "imagenet/imagenet.py": ["--epochs", "1", "--batch-size", "16", "--input-size", "32", "--warmup", "0.5"]}
IMAGENET_SCRIPTS = ("statistic_imagenet.py", "imagenet/imagenet.py")


def fenced(language: str) -> List[str]:
    """The README's ```language blocks, dedented."""
    return [textwrap.dedent(block) for block in
            re.findall(rf"^[ \t]*```{language}\n(.*?)^[ \t]*```", README, flags=re.S | re.M)]


def shell_commands() -> List[List[str]]:
    """Every command of the README's bash blocks as words (continued lines joined, comments dropped, ``&&``
    chains split)."""
    words = []
    for block in fenced("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            command: List[str] = []
            for word in shlex.split(line, comments=True) + ["&&"]:
                if word != "&&":
                    command.append(word)
                elif command:
                    words.append(command)
                    command = []
    return words


def _script(path: str):
    spec = importlib.util.spec_from_file_location(path.replace("/", "_").removesuffix(".py"), REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_digits(seed=0):
    """Digits cut to 128 training and 64 test images."""
    train_aug, train_plain, test = datasets.digits_datasets(seed)
    return Subset(train_aug, range(128)), Subset(train_plain, range(128)), Subset(test, range(64))


def flag_value(argv: List[str], flag: str):
    """The value of ``flag`` in ``argv`` (either spelling), or None."""
    spellings = {flag, flag.replace("_", "-")}
    return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in spellings), None)


def reduced(argv: List[str], script: str, data: Dict[str, str]) -> List[str]:
    """``argv`` with the tiny data in place of the README's paths, tiny sizes, on the CPU."""
    return [data.get(word, word) for word in argv] + TINY[script] + ["--device", "cpu", "-j", "0"]


def make_weights(path: str, model: str, dataset: str) -> None:
    """Seeded random weights of ``model`` saved where the command expects trained ones."""
    torch.manual_seed(0)
    classes = {"num_classes": 10} if dataset == "imagenet" else {}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": build_model(model, dataset, **classes).state_dict()}, path)


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory, cifar_root, imagefolder_root):
    """Every README shell command run in order in one fresh folder: {command: exit status}."""
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(cifar_root, folder / "data" / "cifar10")
    scripts = {name: _script(name) for name in ("prune_cifar.py", *IMAGENET_SCRIPTS)}
    data = {"/data/cifar10": str(cifar_root), "/data/imagenet": str(imagefolder_root)}
    statuses, last = {}, {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setattr(cifar_steps, "digits_datasets", small_digits)
        for name, (checked, unchecked, mean, std) in datasets._CIFAR.items():  # the stand-in is not the release
            patch.setitem(datasets._CIFAR, name, (unchecked, unchecked, mean, std))
        for words in shell_commands():
            command = " ".join(words)
            if any(command.startswith(prefix) for prefix in NOT_RUN):
                continue
            if words[0] == "torchrun":  # one process instead of --nproc_per_node N
                words = ["python", *words[3:]]
            if words[:3] == ["python", "-m", "cdp_gfi.flops"]:
                statuses[command] = flops_main(words[3:])
                continue
            script, argv = words[1], words[2:]
            if "..." in argv:  # "the command above, plus"
                argv = last[script] + argv[argv.index("...") + 1:]
            last[script] = argv
            weights = flag_value(argv, "--pretrained_dir")
            if weights and not Path(weights).exists():
                make_weights(weights, flag_value(argv, "--model"),
                             "imagenet" if script in IMAGENET_SCRIPTS else "cifar10")
            statuses[command] = scripts[script].main(reduced(argv, script, data))
    return folder, statuses


def test_every_shell_command_runs_or_is_listed_with_a_reason(readme_folder):
    _, statuses = readme_folder
    commands = [" ".join(words) for words in shell_commands()]
    assert {c for c in commands if not any(c.startswith(p) for p in NOT_RUN)} == set(statuses)
    assert all(any(c.startswith(p) for c in commands) for p in NOT_RUN)  # no stale entries
    assert {c: s for c, s in statuses.items() if s != 0} == {}
    assert any(c.startswith("python prune_cifar.py --dataset digits") for c in statuses)  # the demo ran
    assert any(c.startswith("python statistic_imagenet.py") for c in statuses)
    assert any("imagenet/imagenet.py" in c for c in statuses)


@pytest.mark.parametrize("index", range(len(fenced("python"))))
def test_python_block_runs_as_written(readme_folder, index, monkeypatch):
    folder, _ = readme_folder
    monkeypatch.chdir(folder)
    for name, (checked, unchecked, mean, std) in datasets._CIFAR.items():  # the stand-in is not the release
        monkeypatch.setitem(datasets._CIFAR, name, (unchecked, unchecked, mean, std))
    if "resnet56-4bfd9763.th" in fenced("python")[index]:
        make_weights("resnet56-4bfd9763.th", "resnet56", "cifar10")
    exec(compile(fenced("python")[index], f"README.md python block {index + 1}", "exec"), {"__name__": "readme"})


def test_the_quoted_result_line_has_the_printed_form():
    line = re.search(r"```\n(result: .*)\n```", README).group(1)
    assert re.fullmatch(r"result: top-1 [\d.]+% -> [\d.]+%; MACs [\d.]+M -> [\d.]+M \([\d.]+% removed\); "
                        r"params [\d.]+K -> [\d.]+K \([\d.]+% removed\); files in runs/digits_resnet20_cdp_seed0",
                        line), line
