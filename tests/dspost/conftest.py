import pytest


@pytest.fixture(scope="module")
def sft_recipe(tmp_path_factory):
    """A bare `kind: sft` recipe: every setting from the schema's defaults and the test's overrides."""
    path = tmp_path_factory.mktemp("recipes") / "sft_test.yaml"
    path.write_text("kind: sft\n")
    return path
