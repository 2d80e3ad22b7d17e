"""plan.py: the grid (typed values, one clear line for a bad one), which norm gets which cells (a setting a
norm does not read gives it one model), the folders of a plan and every cell validated before anything trains."""
import pytest

from normlab.config import Config
from normlab.errors import ConfigError
from normlab.norms import NORMS, norm_options, reads
from normlab.plan import NEW, check_sizes, parse_grid, plan_sweep, sweep_cells
from normlab.rundir import cell_folder


def test_grid_values_are_typed_as_their_setting():
    grid = parse_grid(["lr=0.05,0.1", "groups=4,8", "act=relu,gelu", "flip=true,off", "widths=16x32x24,16x24x32", "norm-batch=8"])
    assert grid == {"lr": (0.05, 0.1), "groups": (4, 8), "act": ("relu", "gelu"), "flip": (True, False),
                    "widths": ((16, 32, 24), (16, 24, 32)), "norm_batch": (8,)}
    assert type(grid["groups"][0]) is int and type(grid["lr"][0]) is float
    # The API's form: typed values, ints for a float setting, one widths tuple
    assert parse_grid({"lr": [1, 0.5], "widths": (16, 32, 24)}) == {"lr": (1.0, 0.5), "widths": ((16, 32, 24),)}


@pytest.mark.parametrize("spec, needle", [
    (["nope=1,2"], "unknown setting 'nope'"),
    (["groupz=4"], "did you mean 'groups'?"),
    (["groups=4.5"], "'4.5' is not a value of groups, which takes whole numbers"),
    (["lr=fast"], "'fast' is not a value of lr, which takes numbers"),
    (["flip=maybe"], "takes true or false"),
    (["widths=16,32,24"], "each widths value written with x"),
    (["norm=bn,gn"], "cannot sweep norm: use --norms"),
    (["seed=1,2"], "cannot sweep seed: use --seeds"),
    (["lr"], "--grid takes SETTING=VALUE,VALUE"),
    (["lr=0.1,0.1"], "--grid lr repeats 0.1"),
    (["lr=0.1", "lr=0.2"], "--grid lr is given twice"),
])
def test_a_bad_grid_is_one_clear_config_error(spec, needle):
    with pytest.raises(ConfigError, match=None) as e:
        parse_grid(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_each_norm_gets_the_cells_of_the_settings_it_reads():
    options = norm_options()
    assert {"groups", "norm_batch"} <= options  # group norm's groups, batch norm's norm_batch (registry: NORMS[n].options)
    grid = parse_grid(["groups=4,8", "norm_batch=8,32", "lr=0.05,0.1"])
    for name, norm in NORMS.items():
        own = [k for k in grid if k in norm.options]
        cells = sweep_cells(name, grid)
        assert len(cells) == 2 ** (len(own) + 1)  # lr is read by every norm; another norm's option gives one cell
        assert all(set(c) == {*own, "lr"} for c in cells)
        assert all(reads(name, k) == (k in own or k not in options) for k in grid)


def test_a_norm_with_its_own_nonlinearity_gets_one_cell_of_an_activation_grid():
    grid = parse_grid(["act=relu,gelu"])
    assert len(sweep_cells("frn", grid)) == 1 and not reads("frn", "act")  # FRN's TLU takes the activation's place
    assert len(sweep_cells("ln", grid)) == 2 and reads("ln", "act")


def test_plan_sweep_folders_and_one_model_per_ignored_setting(tmp_path):
    grid = parse_grid(["norm_batch=2,4,8", "groups=4,8"])
    jobs = plan_sweep(Config(epochs=1), ["bn", "gn", "ln"], grid, 2, 0, tmp_path, False, "hint")
    folders = [j.out.relative_to(tmp_path).as_posix() for j in jobs]
    assert folders[:6] == ["bn/norm_batch=2/seed0", "bn/norm_batch=4/seed0", "bn/norm_batch=8/seed0",
                           "gn/groups=4/seed0", "gn/groups=8/seed0", "ln/seed0"]
    assert len(jobs) == 2 * (3 + 2 + 1) and all(j.action == NEW for j in jobs)
    gn = next(j for j in jobs if j.out.name == "seed1" and j.out.parent.name == "groups=8")
    assert gn.cfg == Config(norm="gn", groups=8, seed=1, epochs=1)
    ln = next(j for j in jobs if j.out.parent.name == "ln")
    assert ln.cfg.groups == 8 and ln.cfg.norm_batch == Config().norm_batch  # trained once, at the base values
    assert cell_folder(tmp_path, "bn", {"widths": (16, 32, 24)}, 3) == tmp_path / "bn" / "widths=16x32x24" / "seed3"


def test_plan_sweep_validates_every_cell_before_anything_trains(tmp_path):
    with pytest.raises(ConfigError, match="gn with groups=5: --groups 5 must divide every width"):
        plan_sweep(Config(), ["bn", "gn"], parse_grid(["groups=4,5"]), 1, 0, tmp_path, False, "hint")
    with pytest.raises(ConfigError, match=r"bn with norm_batch=-1: --norm-batch must be 0 \(the whole batch\) or more"):
        plan_sweep(Config(), ["bn", "gn"], parse_grid(["norm_batch=8,-1"]), 1, 0, tmp_path, False, "hint")
    with pytest.raises(ConfigError, match="unknown norm 'xn'"):
        plan_sweep(Config(), ["bn", "xn"], {}, 1, 0, tmp_path, False, "hint")
    assert not tmp_path.joinpath("bn").exists()


def test_a_plan_needs_a_seed_and_a_job_and_each_models_settings_are_the_configs_to_check(tmp_path):
    """--seeds and --jobs are the plan's own numbers (one message each, whoever asks: run, sweep, the executor);
    a model's settings are Config.validate's, with its one message for an unknown norm."""
    with pytest.raises(ConfigError, match=r"^--seeds must be at least 1 \(got 0\)$"):
        check_sizes(("bn",), 0)
    with pytest.raises(ConfigError, match=r"^--jobs must be at least 1 \(got 0\)$"):
        check_sizes(("bn",), 1, 0)
    with pytest.raises(ConfigError, match="unknown norm 'xn'; choose one of: bn, gn, ln"):
        plan_sweep(Config(), ("bn", "xn"), {}, 1, 0, tmp_path, False, "")
    assert not any(tmp_path.iterdir())
