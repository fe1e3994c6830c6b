"""After a hot upgrade: a restarted machine serves v2 from its first request (startup reapply), and a
machine booted from a new image (a cold deploy) does not apply the stale hot upgrade."""

from __future__ import annotations

import json
import urllib.request

from tests.e2e import examples

import flydeploy

pytest_plugins = ["tests.fakefly.fixtures"]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url + "/version", timeout=10) as response:
        return json.loads(response.read())


def _boot_log(machine) -> str:
    return machine.logs().rsplit("[fakefly] starting", 1)[-1]


def test_restart_catches_up_before_serving_and_a_cold_deploy_drops_the_hot_upgrade(fakefly, seaweed, tmp_path):
    tree, app = examples.fly_app(fakefly, seaweed, tmp_path, "chat", machines=1, command=examples.CHAT_COMMAND)
    machine = app.machines[0]
    first_image = machine.image_ref
    assert _get(examples.machine_url(machine))["version"] == "v1"
    examples.to_v2("chat", tree)
    result = examples.hot(fakefly, tree, "--version", "v2")
    assert result.returncode == 0, result.stdout + result.stderr

    machine.stop()
    machine.start()  # boots from the image again: the files changed in place are gone
    url = examples.machine_url(machine)
    # The lifespan printed "ready v2" before uvicorn served anything: the catch-up came first.
    assert "ready v2" in _boot_log(machine), _boot_log(machine)
    answer = _get(url)
    assert answer["version"] == "v2" and answer["tally"] == {"messages": 0, "since_upgrade": 0}
    assert machine.image_ref == first_image

    examples.set_version(tree, "chat.py", "v3-cold")
    cold_image = fakefly.build_image(app.name, tree, "deployment-cold")
    machine.update(image=cold_image)  # what `fly deploy` does to each machine
    url = examples.machine_url(machine)
    assert "ready v3-cold" in _boot_log(machine), _boot_log(machine)
    assert _get(url)["version"] == "v3-cold"
    current, _ = flydeploy.read_current(seaweed.client(), app.name)
    assert current["image_ref"] == cold_image and current["hot_upgrade"] is None
