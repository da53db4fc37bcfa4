from __future__ import annotations

import pandas as pd

from clip_dfkd.params import ClassNames, PromptGenerationParams
from clip_dfkd.pipelines.prompt_generation.nodes import generate_prompts


def _params(**overrides) -> PromptGenerationParams:
    raw = {"styles": ["photo", "oil painting"], "templates": ["a {style} of a {class_name}", "{class_name}, {style}"]}
    return PromptGenerationParams.model_validate({**raw, **overrides, "images_per_class_and_style": 3})


def test_one_row_per_image_with_filled_templates() -> None:
    table = generate_prompts(ClassNames.model_validate(["dog", "hot air balloon"]), _params())

    assert len(table) == 2 * 2 * 3
    assert table.groupby(["class_name", "style"]).size().eq(3).all()
    first = table.iloc[0]
    assert (first.class_name, first.style, first.prompt) == ("dog", "photo", "a photo of a dog")
    assert table.iloc[1].prompt == "dog, photo"  # templates are used in turn
    assert set(table.loc[table.class_name == "hot air balloon", "class_index"]) == {1}
    assert table["prompt_id"].is_unique
    assert table.iloc[-1].prompt_id == "hot-air-balloon-oil-painting-0002"
    assert table["method"].eq("vanilla").all()
    assert table["style_vector_id"].isna().all()


def test_seeds_are_reproducible_and_do_not_shift_when_classes_are_added() -> None:
    small = generate_prompts(ClassNames.model_validate(["dog"]), _params())
    again = generate_prompts(ClassNames.model_validate(["dog"]), _params())
    larger = generate_prompts(ClassNames.model_validate(["cat", "dog"]), _params())
    reseeded = generate_prompts(ClassNames.model_validate(["dog"]), _params(seed=1))

    pd.testing.assert_frame_equal(small, again)
    dog_seeds = larger.loc[larger.class_name == "dog"].set_index("prompt_id")["seed"]
    assert dog_seeds.to_dict() == small.set_index("prompt_id")["seed"].to_dict()
    assert small["seed"].is_unique
    assert not set(small["seed"]) & set(reseeded["seed"])


def test_pipeline_writes_the_prompt_table(demo_project) -> None:
    demo_project.run("prompt_generation")

    table = pd.read_parquet(demo_project.path / "data/02_intermediate/prompt_table.parquet")
    assert len(table) == 3 * 3 * 4  # demo: classes × styles × images_per_class_and_style
    assert list(table.columns[:3]) == ["prompt_id", "class_name", "class_index"]
    assert set(table["class_name"]) == {"ball", "box", "tent"}
