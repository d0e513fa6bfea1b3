"""The monitor page in Debian's headless Chromium: a commit made through the files shows up, a
click resets a branch, hostile labels stay text, 10,000 snapshots stay usable, and the real page
screenshots at the README's size.

The README's docs/img/monitor.png itself shows the benchmark's workload: tools/monitor_screenshot.py
takes it (with ``CASCOWFS_UPDATE_SCREENSHOTS=1``; CI leaves the tree clean).
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from fusehelpers import Cascow, mounted, needs_fuse
from support.browser import chromium, chromium_unavailable, episode, fake_mount, monitor
from support.processes import REPO

pytestmark = pytest.mark.skipif(chromium_unavailable() is not None,
                                reason=chromium_unavailable() or "")

SCREENSHOT = REPO / "docs" / "img" / "monitor.png"
LOAD_SECONDS = 30  # loading the page and the tree the first time, on a loaded machine
COMMIT_SHOWN_SECONDS = 2  # a commit appears as a node within this (docs/monitor.md)


def wait(driver, seconds: float, condition, message: str):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page redraws on every update: an element found a moment ago may be gone.
    redrawn = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, seconds, poll_frequency=0.05,
                         ignored_exceptions=redrawn).until(condition, message)


def node_shown(ident: str):
    def present(driver):
        found = driver.find_elements("css selector", f'g.node[data-id="{ident}"]')
        return found[0] if found else False
    return present


def click_node(driver, ident: str) -> None:
    wait(driver, LOAD_SECONDS, node_shown(ident), f"node {ident} never shown")
    driver.find_element("css selector", f'g.node[data-id="{ident}"] circle').click()
    wait(driver, 5, lambda d: d.find_element("id", "node-id").text == ident, "node panel")


def shown_text(text: str) -> str:
    """Text as a person reads it: without the invisible marks that isolate each label value's
    direction (FSI, PDI)."""
    return text.replace("\u2068", "").replace("\u2069", "")


def text_of(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def browser_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


# -- against a real daemon ---------------------------------------------------------------------
@needs_fuse
def test_commit_appears_and_a_click_resets_the_branch():
    with mounted() as fs:
        os.mkdir(fs.mnt / "branches" / "b1")
        fs.sh('echo "s1 reward=0.25 visits=1" > $MNT/branches/b1/commit')
        fs.sh('echo "branch b2 s1" > $MNT/ctl')
        with monitor(fs.mnt) as mon, chromium() as driver:
            driver.get(mon.url)
            wait(driver, LOAD_SECONDS, node_shown("s1"), "the first snapshot never shown")
            wait(driver, LOAD_SECONDS, lambda d: text_of(d, "count-branches") == "2", "branches")

            tree = Path(os.readlink(fs.mnt / "branches" / "b1" / "tree"))
            (tree / "step.txt").write_text("step 2\n")
            fs.sh('echo "s2 reward=0.75 visits=2" > $MNT/branches/b1/commit')
            wait(driver, COMMIT_SHOWN_SECONDS, node_shown("s2"),
                 f"a commit was not shown as a node within {COMMIT_SHOWN_SECONDS} s")
            wait(driver, 5, lambda d: "reward=0.75" in shown_text(d.find_element(
                "css selector", 'g.node[data-id="s2"] .node-labels').text),
                 "the new node does not show its labels")
            fs.sh('echo "label s2 visits=3" > $MNT/ctl')
            wait(driver, LOAD_SECONDS, lambda d: any(
                row.text.split()[1:3] == ["label", "s2"]
                for row in d.find_elements("css selector", "#events tbody tr")),
                 "a label's row does not name the snapshot it labelled")

            (tree / "scratch.txt").write_text("not committed\n")
            assert fs.sh("cat $MNT/branches/b1/status").stdout == "A scratch.txt\n"
            click_node(driver, "s1")
            from selenium.webdriver.support.ui import Select

            Select(driver.find_element("id", "rollback-branch")).select_by_value("b1")
            driver.find_element("id", "rollback-button").click()
            wait(driver, 5, lambda d: d.find_element("id", "confirm").is_displayed(), "dialog")
            assert "b1" in text_of(driver, "confirm-text") and "s1" in text_of(driver, "confirm-text")
            driver.find_element("id", "confirm-ok").click()
            wait(driver, 30, lambda d: "now sits on s1" in text_of(d, "rollback-result"),
                 "no result of the reset shown")

            assert (fs.mnt / "branches" / "b1" / "parent").read_text() == "s1\n"
            assert (fs.mnt / "branches" / "b1" / "status").read_text() == ""
            assert not (tree / "scratch.txt").exists() and not (tree / "step.txt").exists()
            assert (fs.mnt / "snapshots" / "s2").is_dir(), "the reset dropped only the branch's work"
            wait(driver, LOAD_SECONDS, lambda d: "b1" in d.find_element(
                "css selector", "#branches tbody").text.split("\n")[0] and
                "s1" in d.find_element("css selector", "#branches tbody").text.split("\n")[0],
                "the branch table does not show b1 on s1")
            assert browser_errors(driver) == []


def test_page_is_an_installable_app(tmp_path):
    """Chromium itself finds nothing missing to install the page as an app (manifest, icons,
    a service worker that handles fetches), and the worker is running."""
    root = fake_mount(tmp_path / "mnt", [episode("s1", None, 1)], {})
    with monitor(root) as mon, chromium() as driver:
        driver.get(mon.url)
        state = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "navigator.serviceWorker.ready.then((r) => done(r.active ? r.active.state : 'none'))"
            ".catch((e) => done(String(e)));")
        assert state in ("activating", "activated")
        assert driver.execute_cdp_cmd("Page.getInstallabilityErrors", {}) == {
            "installabilityErrors": []}
        manifest = driver.execute_cdp_cmd("Page.getAppManifest", {})
        assert manifest["errors"] == [] and manifest["url"] == mon.url + "manifest.webmanifest"


def _search(fs: Cascow) -> None:
    """A small search through the files: three rounds of expanding the best node."""
    rng = random.Random(23)
    fs.sh('mkdir $MNT/branches/agent-0 && echo "root kind=import visits=12 reward=0.31" '
          '> $MNT/branches/agent-0/commit')
    rewards = {"root": 0.31}
    best, step = "root", 0
    for depth in range(3):
        children = []
        for _ in range(3 if depth < 2 else 2):
            step += 1
            name = f"step-{step}"
            rewards[name] = round(rng.uniform(0.1, 0.95), 2)
            action = rng.choice(["fix-parser", "add-test", "rename-var", "revert-hunk"])
            fs.sh(f'echo "branch try{step} {best}" > $MNT/ctl && '
                  f'echo "commit try{step} {name} action={action} reward={rewards[name]} '
                  f'visits={rng.randint(1, 9)}" > $MNT/ctl && echo "discard try{step}" > $MNT/ctl')
            children.append(name)
        best = max(children, key=rewards.__getitem__)
    fs.sh(f'echo "rebase agent-0 {best}" > $MNT/ctl && echo "branch agent-1 {children[0]}" '
          '> $MNT/ctl && echo "branch agent-2 step-2" > $MNT/ctl')


@needs_fuse
def test_screenshot_of_the_page_is_taken_at_the_readme_size():
    with mounted() as fs:
        _search(fs)
        with monitor(fs.mnt) as mon, chromium() as driver:
            driver.get(mon.url)
            wait(driver, LOAD_SECONDS, lambda d: text_of(d, "count-branches") == "3", "branches")
            click_node(driver, "step-4")
            png = driver.get_screenshot_as_png()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 1200 and height >= 600
    assert SCREENSHOT.read_bytes()[16:24] == png[16:24], (
        "docs/img/monitor.png is not at the page's size: take it again with "
        "CASCOWFS_UPDATE_SCREENSHOTS=1 tools/monitor_screenshot.py")


# -- over a directory laid out like a mount (no daemon needed) ---------------------------------
HOSTILE = ['<img src=x onerror="window.__xss=1">', "<script>window.__xss=1</script>",
           '"><svg onload="window.__xss=1">', "javascript:window.__xss=1", "&lt;b&gt;"]


def test_hostile_labels_are_shown_as_text(tmp_path):
    nodes = [episode("s1", None, 1, reward="0.5")]
    nodes += [episode(f"x{i}", "s1", 2 + i, **{"action": text, "reward": "0.1",
                                                "k" + str(i): text}) for i, text in enumerate(HOSTILE)]
    root = fake_mount(tmp_path / "mnt", nodes, {"b1": "x0"})
    with monitor(root) as mon, chromium() as driver:
        driver.get(mon.url)
        for i, text in enumerate(HOSTILE):
            click_node(driver, f"x{i}")
            cells = driver.find_elements("css selector", "#node-labels tbody td")
            assert text in [c.text for c in cells]
        driver.find_element("id", "search").send_keys("action=" + HOSTILE[1])
        wait(driver, 5, lambda d: "1 match" in text_of(d, "tree-note"), "search by label")
        assert driver.execute_script("return window.__xss") is None
        injected = driver.execute_script(
            "return document.querySelectorAll('img, script:not([src]), #tree svg, [onerror],"
            " [onload]').length")
        assert injected == 0


def test_the_page_reads_numbers_as_find_does_and_keeps_each_value_to_itself(tmp_path):
    """The page's search and colours take a number where `find` does (no hex, no blanks);
    a value's RTL override ends with the value instead of reversing the labels drawn after
    it; a shortened value keeps whole characters (half an emoji left a lone surrogate)."""
    nodes = [episode("s1", None, 1, reward="0.5"),
             episode("rtl", "s1", 2, reward="\u202e0.9", visits="100"),
             episode("emoji", "s1", 3, reward="\U0001f600" * 20)]
    root = fake_mount(tmp_path / "mnt", nodes, {"b1": "s1"})
    with monitor(root) as mon, chromium() as driver:
        driver.get(mon.url)
        wait(driver, LOAD_SECONDS, node_shown("emoji"), "node emoji never shown")
        read = driver.execute_script(
            "return ['0x10', '9', ' ', '1e3', '-2.5', '.5', 'Infinity', 'NaN', '1_0']"
            ".map((t) => { const v = CascowTree.labelNumber(t); return Number.isNaN(v) ? 'nan' : v; })")
        assert read == ["nan", 9, "nan", 1000, -2.5, 0.5, "nan", "nan", "nan"]

        def drawn(ident: str) -> str:
            return driver.execute_script(
                f"return document.querySelector('g.node[data-id=\"{ident}\"] text.node-labels')"
                ".textContent")

        assert "reward=\u2068\u202e0.9\u2069 visits=\u2068100\u2069" in drawn("rtl")
        emoji = drawn("emoji")  # a lone surrogate would not even come back from the browser
        assert emoji.startswith("reward=\u2068" + "\U0001f600" * 15 + "\u2026"), emoji


def _random_tree(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    nodes = [episode("n0", None, 0, reward="0.5", visits="100")]
    for i in range(1, count):
        parent = nodes[int(rng.random() ** 3 * i)]["id"] if i > 1 else "n0"
        nodes.append(episode(f"n{i}", parent, i, reward=f"{rng.random():.3f}",
                             visits=str(rng.randint(1, 50))))
    return nodes


def test_ten_thousand_snapshots_stay_usable(tmp_path):
    """10,000 nodes: the page shows the live branches' neighbourhood, finds a node by id or by
    label, opens a collapsed node, and caps the whole tree instead of drawing all of it."""
    nodes = _random_tree(10_000, seed=7)
    root = fake_mount(tmp_path / "mnt", nodes, {"a": "n9999", "b": "n5000", "c": "n17"})
    with monitor(root) as mon, chromium() as driver:
        driver.get(mon.url)
        wait(driver, LOAD_SECONDS, lambda d: "of 10000 nodes shown" in text_of(d, "tree-note"),
             "the tree never loaded")
        shown = len(driver.find_elements("css selector", "g.node"))
        assert 3 < shown <= 600
        for branch_node in ("n9999", "n5000", "n17"):
            assert node_shown(branch_node)(driver)
        assert not node_shown("n4321")(driver)

        search = driver.find_element("id", "search")
        search.send_keys("n4321")
        wait(driver, 5, node_shown("n4321"), "search by id")
        search.clear()
        search.send_keys("reward>0.999")
        expected = sum(float(n["labels"]["reward"]) > 0.999 for n in nodes)
        wait(driver, 5, lambda d: f"{expected} match" in text_of(d, "tree-note"),
             f"label search: {expected} expected, {text_of(driver, 'tree-note')}")
        search.clear()
        driver.execute_script("document.getElementById('search').dispatchEvent(new Event('input'))")

        wait(driver, 5, lambda d: "match" not in text_of(d, "tree-note"), "search cleared")
        toggle = driver.find_element("css selector", '[data-toggle="n0"]')
        hidden = int(toggle.text.lstrip("+"))
        assert hidden > 0
        before = len(driver.find_elements("css selector", "g.node"))
        toggle.click()
        wait(driver, 5, lambda d: len(d.find_elements("css selector", "g.node")) >= before + min(
            hidden, 600 - before), "opening a node")

        from selenium.webdriver.support.ui import Select

        Select(driver.find_element("id", "view-mode")).select_by_value("all")
        wait(driver, 5, lambda d: "capped at 600" in text_of(d, "tree-note"), "whole tree cap")
        assert len(driver.find_elements("css selector", "g.node")) <= 600
        assert browser_errors(driver) == []


def test_an_outsiders_operations_name_their_uid_and_stay_out_of_the_chart(tmp_path):
    """A refused command of a user outside root and the admin group is shown with its uid
    (as text, whatever its words), never as root's, and draws no bar in the latency chart."""
    base = {"time": "2026-12-05T12:00:00Z", "result": "ok", "latency_ms": 2.0}
    roots = [{**base, "time_ns": t * 10**9, "op": op, "names": ["b1"], "id": f"s{t}"}
             for t, op in enumerate(["import", "branch", "commit"], 1)]
    refused = [{**base, "time_ns": (10 + i) * 10**9, "op": "commit", "result": "EPERM",
                "names": ["rootwork", HOSTILE[i % len(HOSTILE)]], "id": None, "uid": 65534,
                "dropped": i} for i in range(8)]
    root = fake_mount(tmp_path / "mnt", [episode("s1", None, 1)], {}, events=roots + refused)
    with monitor(root) as mon, chromium() as driver:
        driver.get(mon.url)

        def rows(d) -> list[str]:
            return [r.text for r in d.find_elements("css selector", "#events tbody tr")]

        wait(driver, LOAD_SECONDS, lambda d: len(rows(d)) == 10, "the operations table")
        shown = rows(driver)
        assert all(r.split()[1:4] == ["commit", "uid", "65534"] and "EPERM" in r
                   for r in shown[:8]), shown
        assert not any("uid" in r for r in shown[8:]), shown
        uids = driver.find_elements("css selector", "#events tr.outsider .uid")
        assert len(uids) == 8 and uids[0].get_attribute("title")
        assert text_of(driver, "outsiders").startswith(
            "8 operation(s) of users outside root and the admin group read"
        ) and "let 7 of theirs go" in text_of(driver, "outsiders")
        assert len(driver.find_elements("css selector", "#latency rect")) == len(roots)
        assert driver.execute_script("return window.__xss") is None
        injected = driver.execute_script(
            "return document.querySelectorAll('img, script:not([src]), #tree svg, [onerror],"
            " [onload]').length")
        assert injected == 0 and browser_errors(driver) == []
