import pytest

from kubetune_operator.settings import DEFAULT_TRAINER_IMAGE, Settings, SettingsError


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.trainer_image == DEFAULT_TRAINER_IMAGE
    assert (settings.metrics_port, settings.health_port) == (8080, 8081)
    assert settings.progress_interval_seconds == 10
    assert settings.namespaces == ()


def test_every_variable_the_chart_sets_is_read() -> None:
    settings = Settings.from_env(
        {
            "KUBETUNE_NAMESPACES": "team-b, team-a,,",
            "KUBETUNE_TRAINER_IMAGE": "registry.example/trainer:1",
            "KUBETUNE_TRAINER_IMAGE_PULL_POLICY": "Always",
            "KUBETUNE_DEFAULT_GPU_RESOURCE": "amd.com/gpu",
            "KUBETUNE_METRICS_PORT": "9000",
            "KUBETUNE_HEALTH_PORT": "9001",
            "KUBETUNE_LISTEN_ADDRESS": "127.0.0.1",
            "KUBETUNE_PROGRESS_INTERVAL_SECONDS": "0.5",
            "KUBETUNE_PROGRESS_TIMEOUT_SECONDS": "1",
            "KUBETUNE_PROGRESS_CONCURRENCY": "4",
            "KUBETUNE_API_CONCURRENCY": "8",
            "KUBETUNE_LOG_LEVEL": "debug",
        }
    )
    assert settings.namespaces == ("team-a", "team-b")
    assert settings.trainer_image == "registry.example/trainer:1"
    assert settings.trainer_image_pull_policy == "Always"
    assert settings.default_gpu_resource == "amd.com/gpu"
    assert (settings.metrics_port, settings.health_port) == (9000, 9001)
    assert settings.listen_address == "127.0.0.1"
    assert settings.progress_interval_seconds == 0.5
    assert settings.progress_timeout_seconds == 1
    assert settings.progress_concurrency == 4
    assert settings.api_concurrency == 8
    assert settings.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("KUBETUNE_METRICS_PORT", "http", "KUBETUNE_METRICS_PORT='http': invalid literal"),
        ("KUBETUNE_HEALTH_PORT", "70000", "must be a port number"),
        ("KUBETUNE_LISTEN_ADDRESS", "localhost", "must be an IP address"),
        ("KUBETUNE_PROGRESS_INTERVAL_SECONDS", "0", "greater than 0"),
        ("KUBETUNE_PROGRESS_CONCURRENCY", "0", "at least 1"),
        ("KUBETUNE_API_CONCURRENCY", "0", "at least 1"),
        ("KUBETUNE_LOG_LEVEL", "loud", "must be one of DEBUG"),
        ("KUBETUNE_TRAINER_IMAGE_PULL_POLICY", "Sometimes", "must be one of Always"),
        ("KUBETUNE_RETRY_MAX_SECONDS", "-1", "greater than 0"),
        ("KUBETUNE_RESYNC_SECONDS", "0", "greater than 0"),
        ("KUBETUNE_RETRY_MAX_SECONDS", "0.5", "is below KUBETUNE_RETRY_BASE_SECONDS=1: the cap must be at least"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError, match=expected) as error:
        Settings.from_env({name: value})
    assert name in str(error.value)
