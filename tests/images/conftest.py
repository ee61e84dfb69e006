"""The image tests need a docker daemon and the two images: the `images` fixture builds them with build.sh (seconds
when current), and skips only outside CI when docker is unavailable."""

from __future__ import annotations

import pytest

from tests.images.containers import build_images, image_name, require_docker


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """{"operator": ..., "trainer": ...}: the images of the current checkout, built if they are not."""
    require_docker()
    build_images()
    return {name: image_name(name) for name in ("operator", "trainer")}
