"""The template engine without root: typed parameters, safe targets, bases, overrides, rendering.

The debian and ubuntu templates are rendered here into a fake tree (no bootstrap), which is the
only test the ubuntu template can have on a machine that cannot reach Ubuntu's mirrors.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from machined import bootstrap, templates
from machined.log import MachinedError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIML4Yb7sDFMG9ftiNlwKKoXyo6gcAoI/wX7RgL13Gap8 me@host"


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "config"
    (d / "templates").mkdir(parents=True)
    monkeypatch.setenv("MACHINED_CONFIG_DIR", str(d))
    return d


def fake_debian(root: Path) -> None:
    """What the rendering of the debian template reads from a bootstrapped tree."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    (root / "root").mkdir(mode=0o700)


def render(name: str, root: Path, *settings: str, release: str | None = None) -> templates.Template:
    tmpl = templates.load(name)
    params = templates.resolve_params(tmpl, list(settings))
    context = dict(params, name="m1", machine_id="0" * 32, release=release or tmpl.default_release, template=name,
                   architecture="amd64")
    templates.render_into(tmpl, str(root), context)
    return tmpl


def test_debian_rendering(tmp_path: Path, config_dir: Path) -> None:
    root = tmp_path / "root"
    fake_debian(root)
    render("debian", root, "hostname=web", f"ssh_authorized_keys={KEY}", "network=static", "address=10.0.0.2/24",
           "gateway=10.0.0.1", "dns=10.0.0.1,9.9.9.9", "timezone=Europe/Berlin", "root_password_hash=$6$x$y")
    assert (root / "etc/hostname").read_text() == "web\n"
    assert "127.0.1.1\tweb" in (root / "etc/hosts").read_text()
    assert (root / "root/.ssh/authorized_keys").read_text() == KEY + "\n"
    assert oct((root / "root/.ssh").stat().st_mode & 0o777) == "0o700"
    assert oct((root / "root/.ssh/authorized_keys").stat().st_mode & 0o777) == "0o600"
    network = (root / "etc/systemd/network/80-container-host0.network").read_text()
    assert "Name=host0" in network and "Address=10.0.0.2/24" in network and "Gateway=10.0.0.1" in network
    assert "DNS=9.9.9.9" in network and "DHCP" not in network.split("[DHCPv4]")[0]
    assert (root / "etc/resolv.conf").read_text() == "nameserver 10.0.0.1\nnameserver 9.9.9.9\n"
    assert os.readlink(root / "etc/localtime") == "/usr/share/zoneinfo/Europe/Berlin"
    assert os.readlink(root / "etc/systemd/system/multi-user.target.wants/systemd-networkd.service").endswith(
        "systemd-networkd.service")
    # Only root's password changed; other accounts are as bootstrapped.
    assert (root / "etc/shadow").read_text() == "root:$6$x$y:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"
    assert "deb http://deb.debian.org/debian bookworm main" in (root / "etc/apt/sources.list").read_text()
    assert "bookworm-security" in (root / "etc/apt/sources.list").read_text()
    assert not (root / "etc/systemd/system/console-getty.service.d/autologin.conf").exists()


def test_debian_defaults_leave_out_optional_files(tmp_path: Path, config_dir: Path) -> None:
    root = tmp_path / "root"
    fake_debian(root)
    render("debian", root, "network=none", "console_autologin=yes", release="trixie")
    assert (root / "etc/hostname").read_text() == "m1\n"
    assert not (root / "root/.ssh").exists()
    # No servers of its own: the placeholder machined binds the host's resolvers over at start.
    assert "nameserver" not in (root / "etc/resolv.conf").read_text()
    assert not (root / "etc/systemd/network/80-container-host0.network").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/systemd-networkd.service").exists()
    assert (root / "etc/systemd/system/console-getty.service.d/autologin.conf").exists()
    assert "trixie-updates" in (root / "etc/apt/sources.list").read_text()
    assert (root / "etc/shadow").read_text().startswith("root::19000:")


def test_ubuntu_renders_ubuntu_sources_on_debian_files(tmp_path: Path, config_dir: Path) -> None:
    root = tmp_path / "root"
    fake_debian(root)
    tmpl = render("ubuntu", root, "hostname=u1", f"ssh_authorized_keys={KEY}")
    assert tmpl.base is not None and tmpl.base.name == "debian"
    assert tmpl.releases == ["noble", "jammy"] and tmpl.components == ["main", "universe"]
    assert tmpl.keyring.endswith("ubuntu-archive-keyring.gpg") and "openssh-server" in tmpl.packages
    sources = (root / "etc/apt/sources.list").read_text()
    assert "deb http://archive.ubuntu.com/ubuntu noble main universe" in sources
    assert "http://security.ubuntu.com/ubuntu noble-security" in sources and "debian" not in sources
    assert (root / "etc/hostname").read_text() == "u1\n"
    assert (root / "root/.ssh/authorized_keys").read_text() == KEY + "\n"
    assert (root / "etc/systemd/network/80-container-host0.network").exists()
    key = bootstrap.cache_key(tmpl, "noble", templates.resolve_params(tmpl, []))
    assert key.startswith(f"ubuntu-noble-{bootstrap.host_arch()}-")


def test_cache_key_follows_what_shapes_the_tree(config_dir: Path) -> None:
    tmpl = templates.load("debian")

    def key(*settings: str, release: str = "bookworm") -> str:
        return bootstrap.cache_key(tmpl, release, templates.resolve_params(tmpl, list(settings)))

    assert key() == key("hostname=other", "mirror=http://example.org/debian")  # rendered, not bootstrapped
    assert len({key(), key(release="trixie"), key("packages=vim"), key("docs=yes")}) == 4
    assert key("packages=vim,curl") == key("packages=curl", "packages=vim")  # a set, in any order


def test_bootstrap_command(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmpl = templates.load("debian")
    params = templates.resolve_params(tmpl, ["packages=vim"])
    tool, argv = bootstrap.command(tmpl, "trixie", params, "/tmp/x")
    assert tool == "mmdebstrap" and argv[-3:] == ["trixie", "/tmp/x", "http://deb.debian.org/debian"]
    assert any(a.startswith("--include=") and "vim" in a and "systemd" in a for a in argv)
    monkeypatch.setenv("MACHINED_BOOTSTRAP_TOOL", "debootstrap")
    tool, argv = bootstrap.command(tmpl, "trixie", params, "/tmp/x")
    assert tool == "debootstrap" and "--variant=minbase" in argv and argv[-3:-1] == ["trixie", "/tmp/x"]


@pytest.mark.parametrize("setting, words", [
    ("nope=1", "has no such parameter"),
    ("console_autologin=maybe", "not a boolean"),
    ("network=bridge", "not one of"),
    ("hostname=a/b", "does not match"),
    ("hostname=a\nb", "control characters"),
    ("timezone=../../../etc/shadow", "does not match"),
    ("root_password_hash=x:0:0", "does not match"),
    ("packages=vim;rm -rf", "does not match"),
    ("mirror=ftp://x", "does not match"),
    ("noequals", "expected KEY=VALUE"),
])
def test_bad_parameters(config_dir: Path, setting: str, words: str) -> None:
    tmpl = templates.load("debian")
    with pytest.raises(MachinedError, match=words):
        templates.resolve_params(tmpl, [setting])


def write_template(config_dir: Path, name: str, toml: str, files: dict[str, str]) -> Path:
    d = config_dir / "templates" / name
    (d / "files").mkdir(parents=True)
    (d / "template.toml").write_text(toml)
    for rel, text in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return d


@pytest.mark.parametrize("toml, files", [
    ('[files]\n"../../escape" = "x.j2"\n', {"x.j2": "x"}),
    ('[files]\n"/etc/abs" = "x.j2"\n', {"x.j2": "x"}),
    ('[files]\n"etc/{{ where }}" = "x.j2"\n[parameters.where]\ndefault = "../../../escape"\n', {"x.j2": "x"}),
    ('[symlinks]\n"../escape" = "/etc/passwd"\n', {}),
])
def test_traversal_targets_refused(tmp_path: Path, config_dir: Path, toml: str, files: dict[str, str]) -> None:
    write_template(config_dir, "evil", toml, files)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(MachinedError, match="unsafe target path"):
        render("evil", root)
    assert list(root.iterdir()) == [] and not (tmp_path / "escape").exists()


def test_symlink_in_rootfs_is_not_followed(tmp_path: Path, config_dir: Path) -> None:
    write_template(config_dir, "plain", "", {"files/etc/motd.j2": "hello"})
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").symlink_to(outside)
    with pytest.raises(MachinedError, match="symbolic link"):
        render("plain", root)
    assert list(outside.iterdir()) == []
    (root / "etc").unlink()
    (root / "etc").mkdir()
    (root / "etc/motd").symlink_to(outside / "motd")  # the file itself: replaced, never written through
    render("plain", root)
    assert (root / "etc/motd").read_text() == "hello" and not (outside / "motd").exists()


def test_source_outside_template_and_symlinked_files_refused(tmp_path: Path, config_dir: Path) -> None:
    write_template(config_dir, "evil1", '[files]\n"etc/x" = "../../../../etc/passwd"\n', {})
    with pytest.raises(MachinedError, match="not a file inside the template"):
        templates.load("evil1")
    d = write_template(config_dir, "evil2", "", {})
    (d / "files/etc").mkdir()
    (d / "files/etc/passwd.j2").symlink_to("/etc/passwd")
    with pytest.raises(MachinedError, match="symbolic link"):
        templates.load("evil2")


def test_sandbox_and_strict_undefined(tmp_path: Path, config_dir: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    write_template(config_dir, "undef", "", {"files/etc/x.j2": "{{ nosuch }}"})
    with pytest.raises(MachinedError, match="nosuch"):
        render("undef", root)
    write_template(config_dir, "unsafe", "", {"files/etc/x.j2": "{{ ''.__class__.__mro__[1].__subclasses__() }}"})
    with pytest.raises(MachinedError, match="unsafe"):
        render("unsafe", root)
    write_template(config_dir, "reader", "", {"files/etc/x.j2": "{{ rootfs_read('../../../etc/passwd') }}"})
    with pytest.raises(MachinedError, match="points out of the root"):
        render("reader", root)
    assert list(root.iterdir()) == []  # every text is rendered before anything is written


def test_template_type_errors_at_load(config_dir: Path) -> None:
    write_template(config_dir, "t1", '[parameters.n]\ntype = "int"\ndefault = "x"\n', {})
    with pytest.raises(MachinedError, match="must be an integer"):
        templates.load("t1")
    write_template(config_dir, "t2", '[parameters.n]\ntype = "float"\n', {})
    with pytest.raises(MachinedError, match="unknown type"):
        templates.load("t2")
    write_template(config_dir, "t3", 'bogus = 1\n', {})
    with pytest.raises(MachinedError, match="unknown key 'bogus'"):
        templates.load("t3")
    write_template(config_dir, "t4", 'base = "t5"\n', {})
    write_template(config_dir, "t5", 'base = "t4"\n', {})
    with pytest.raises(MachinedError, match="loop"):
        templates.load("t4")


def test_config_dir_overrides_and_extends(tmp_path: Path, config_dir: Path) -> None:
    # An override of busybox that extends the built-in one: its files and parameters, plus a motd.
    write_template(config_dir, "busybox", 'base = "busybox"\ndescription = "mine"\n'
                   '[parameters.motd]\ntype = "str"\ndefault = "hi"\n', {"files/etc/motd.j2": "{{ motd }} {{ name }}"})
    write_template(config_dir, "extra", 'description = "new"\n', {"files/etc/extra.j2": "x"})
    names = {t.name: t for t in templates.available()}
    assert names["busybox"].description == "mine" and "extra" in names and "debian" in names
    root = tmp_path / "root"
    root.mkdir()
    render("busybox", root, "motd=hello", "timezone=UTC")
    assert (root / "etc/motd").read_text() == "hello m1"
    assert (root / "etc/inittab").exists()  # from the built-in busybox
