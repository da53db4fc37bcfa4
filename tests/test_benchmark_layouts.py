"""Each published benchmark read from a small copy built here in its real layout and list-file
format (docs/benchmarks.md says where each format was looked up)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from clip_dfkd.benchmark_layouts import LAYOUTS, BenchmarkError
from clip_dfkd.benchmarks import scan_benchmark, skipped_at_root
from clip_dfkd.params import BenchmarkParams, ClassNames


def _image(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")
    return path


def _scan(layout: str, root: Path, classes: str | list[str] | None = None, **settings):
    params = BenchmarkParams.model_validate({"root": str(root), "layout": layout, **settings})
    return {d.domain: d for d in scan_benchmark(layout, params, list(ClassNames.model_validate(classes or layout)))}


def _skipped_at_root(layout: str, root: Path) -> list[tuple[str, str]]:
    params = BenchmarkParams.model_validate({"root": str(root), "layout": layout})
    return [(path.name, reason) for path, reason in skipped_at_root(layout, params)]


def _relative(domain, root: Path) -> list[tuple[str, str]]:
    """(path under root, class name) per image, with the run's class names."""
    return [(str(p.relative_to(root)), label) for p, label in zip(domain.paths, domain.labels, strict=True)]


def _classes(domain, classes: list[str]) -> list[str]:
    return [classes[label] for label in domain.labels]


# --- PACS --------------------------------------------------------------------------------


def _pacs(root: Path) -> Path:
    """The download's ``kfold/`` folder with the official 1-based ``*_test_kfold.txt`` lists
    in ``splits/`` beside it (Dassl's arrangement)."""
    kfold = root / "kfold"
    for domain in ("art_painting", "cartoon", "photo", "sketch"):
        suffix = ".png" if domain == "sketch" else ".jpg"
        lines = []
        for label, name in ((1, "dog"), (7, "person")):
            relative = f"{domain}/{name}/pic_00{label}{suffix}"
            _image(kfold / relative)
            lines.append(f"{relative} {label}")
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{domain}_test_kfold.txt").write_text("\n".join(lines) + "\n")
    return kfold


def test_pacs_reads_the_official_lists_with_classes_from_the_listed_folders(tmp_path) -> None:
    kfold = _pacs(tmp_path)
    # A circulated copy of the lists labels one dog 0; the listed folder still says dog.
    listed = tmp_path / "splits" / "art_painting_test_kfold.txt"
    listed.write_text(listed.read_text().replace(" 1\n", " 0\n"))
    _image(kfold / "art_painting" / "dog" / "not_listed.jpg")  # on disk, not in the official list

    domains = _scan("pacs", kfold)

    assert list(domains) == ["art_painting", "cartoon", "photo", "sketch"]
    assert _relative(domains["art_painting"], kfold) == [
        ("art_painting/dog/pic_001.jpg", 0),
        ("art_painting/person/pic_007.jpg", 6),
    ]
    assert _relative(domains["sketch"], kfold)[0] == ("sketch/dog/pic_001.png", 0)


def test_only_root_entries_that_are_neither_domains_nor_lists_are_skipped(tmp_path) -> None:
    kfold = _pacs(tmp_path)
    (tmp_path / "splits" / "photo_test_kfold.txt").rename(kfold / "photo_test_kfold.txt")
    (kfold / "splits").mkdir()
    (kfold / "README.txt").write_text("PACS")
    (kfold / ".DS_Store").write_bytes(b"finder")

    assert _skipped_at_root("pacs", kfold) == [
        ("README.txt", "at the benchmark's root, not a domain folder or list file of PACS")
    ]
    assert _skipped_at_root("folders", kfold) == [
        ("README.txt", "at the benchmark's root, not a domain folder"),
        ("photo_test_kfold.txt", "at the benchmark's root, not a domain folder"),
    ]


def test_pacs_without_its_lists_reads_the_class_folders(tmp_path) -> None:
    kfold = _pacs(tmp_path)
    for listed in (tmp_path / "splits").iterdir():
        listed.unlink()
    _image(kfold / "photo" / "horse" / "extra.jpg")

    domains = _scan("pacs", kfold)

    assert _classes(domains["photo"], LAYOUTS["pacs"].classes) == ["dog", "horse", "person"]


def test_a_listed_file_missing_on_disk_is_skipped_with_the_reason(tmp_path) -> None:
    kfold = _pacs(tmp_path)
    (kfold / "cartoon" / "person" / "pic_007.jpg").unlink()

    cartoon = _scan("pacs", kfold)["cartoon"]

    assert _classes(cartoon, LAYOUTS["pacs"].classes) == ["dog"]
    assert [(p.name, reason) for p, reason in cartoon.skipped] == [
        ("pic_007.jpg", "listed in cartoon_test_kfold.txt but not on disk")
    ]


def test_a_missing_benchmark_names_its_path_layout_and_where_it_is_published(tmp_path) -> None:
    with pytest.raises(BenchmarkError) as caught:
        _scan("pacs", tmp_path / "PACS")
    message = str(caught.value)
    assert message.startswith(
        f"ood_evaluation.benchmarks.pacs.root='{tmp_path / 'PACS'}': no such folder; expected PACS as"
    )
    assert "<root>/<domain>/<class>/<images>" in message and "https://" in message and "\n" not in message


def test_a_missing_domain_names_the_folders_looked_for(tmp_path) -> None:
    kfold = _pacs(tmp_path)
    for image in (kfold / "sketch").rglob("*.png"):
        image.unlink()
    for folder in sorted((kfold / "sketch").rglob("*"), reverse=True):
        folder.rmdir()
    (kfold / "sketch").rmdir()

    looked_for = r"domains \['sketch'\] not found \(looked for \['.*/kfold/sketch'\], in any case\)"
    with pytest.raises(BenchmarkError, match=looked_for):
        _scan("pacs", kfold)
    with pytest.raises(BenchmarkError, match=r"domains=\['Sketch'\]: not domains of PACS; allowed: \['art_painting'"):
        _scan("pacs", kfold, domains=["Sketch"])


# --- VLCS --------------------------------------------------------------------------------


def test_vlcs_in_domainbeds_layout(tmp_path) -> None:
    for domain in ("Caltech101", "LabelMe", "SUN09", "VOC2007"):
        _image(tmp_path / domain / "bird" / "a.jpg")
        _image(tmp_path / domain / "person" / "b.jpg")

    domains = _scan("vlcs", tmp_path)

    assert list(domains) == ["Caltech101", "LabelMe", "SUN09", "VOC2007"]
    assert _classes(domains["SUN09"], LAYOUTS["vlcs"].classes) == ["bird", "person"]


@pytest.mark.parametrize(
    ("split", "expected"),
    [("test", ["test_imgs_1.jpg"]), ("all", ["crossval_imgs_1.jpg", "train_imgs_1.jpg", "test_imgs_1.jpg"])],
)
def test_vlcs_in_jigens_layout_with_numbered_class_folders(tmp_path, split, expected) -> None:
    for folder in ("CALTECH", "LABELME", "PASCAL", "SUN"):
        _image(tmp_path / folder / "full" / "3" / "train_imgs_1.jpg")
        _image(tmp_path / folder / "full" / "3" / "crossval_imgs_1.jpg")
        _image(tmp_path / folder / "train" / "3" / "train_imgs_1.jpg")  # within "full" too
        _image(tmp_path / folder / "test" / "3" / "test_imgs_1.jpg")

    domains = _scan("vlcs", tmp_path, split=split)

    assert list(domains) == ["Caltech101", "LabelMe", "SUN09", "VOC2007"]  # published names
    voc = domains["VOC2007"]
    assert [p.name for p in voc.paths] == expected
    assert set(_classes(voc, LAYOUTS["vlcs"].classes)) == {"dog"}  # folder 3 is dog


def test_vlcs_domain_folders_in_any_case_and_other_root_entries_skipped(tmp_path) -> None:
    """Circulating copies lower-case the domains; a folder or file beside them is no domain."""
    for folder in ("caltech", "labelme", "pascal", "sun"):
        _image(tmp_path / folder / "bird" / "a.jpg")
    _image(tmp_path / "OfficeHome" / "Art" / "x.jpg")
    (tmp_path / "download.sh").write_text("wget ...")

    domains = _scan("vlcs", tmp_path)

    assert list(domains) == ["Caltech101", "LabelMe", "SUN09", "VOC2007"]
    assert [p.relative_to(tmp_path).parts[0] for d in domains.values() for p in d.paths] == [
        "caltech",
        "labelme",
        "sun",
        "pascal",
    ]
    assert _skipped_at_root("vlcs", tmp_path) == [
        ("OfficeHome", "at the benchmark's root, not a domain folder or list file of VLCS"),
        ("download.sh", "at the benchmark's root, not a domain folder or list file of VLCS"),
    ]


def test_a_domain_without_class_folders_stops_the_scan(tmp_path) -> None:
    for folder in ("CALTECH", "LABELME", "PASCAL", "SUN"):
        _image(tmp_path / folder / "full" / "3" / "a.jpg")
        _image(tmp_path / folder / "test" / "3" / "b.jpg")
    for image in list((tmp_path / "SUN").rglob("*.jpg")):
        image.unlink()
        image.parent.rmdir()  # SUN/full/ and SUN/test/ are left without class folders

    with pytest.raises(BenchmarkError) as caught:
        _scan("vlcs", tmp_path)
    assert str(caught.value).startswith(
        f"ood_evaluation.benchmarks.vlcs.root='{tmp_path}': the domain folders ['SUN09'] hold no class folder; "
        "expected VLCS as <root>/<domain>/<class>/<images> (DomainBed)"
    )


# --- OfficeHome --------------------------------------------------------------------------


@pytest.mark.parametrize("real_world_folder", ["Real World", "Real_World"])
def test_officehome_with_its_domain_names_and_class_folders(tmp_path, real_world_folder) -> None:
    for folder in ("Art", "Clipart", "Product", real_world_folder):
        _image(tmp_path / folder / "Alarm_Clock" / "00001.jpg")
        _image(tmp_path / folder / "Postit_Notes" / "00002.jpg")
        _image(tmp_path / folder / "TV" / "00003.jpg")

    domains = _scan("officehome", tmp_path)

    assert list(domains) == ["Art", "Clipart", "Product", "Real World"]
    assert _classes(domains["Real World"], LAYOUTS["officehome"].classes) == ["alarm clock", "sticky notes", "TV"]
    assert domains["Real World"].paths[0].parent.parent.name == real_world_folder


def test_officehome_class_list_is_prompt_ready() -> None:
    classes = LAYOUTS["officehome"].classes
    assert len(classes) == 65 == len(set(classes))
    assert {"desk lamp", "flip flops", "toothbrush", "trash can", "TV"} <= set(classes)
    assert all("_" not in name for name in classes)


# --- DomainNet ---------------------------------------------------------------------------


def _domainnet(root: Path) -> None:
    rows = {"aircraft_carrier": 0, "hot_air_balloon": 149, "The_Eiffel_Tower": 308, "zigzag": 344}
    (root / "splits").mkdir(parents=True)
    for domain in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"):
        for part in ("train", "test"):
            lines = []
            for folder, label in rows.items():
                name = f"{part}{label}.png" if domain == "quickdraw" else f"{domain}_{label + 1:03d}_{part}.jpg"
                _image(root / domain / folder / name)
                lines.append(f"{domain}/{folder}/{name} {label}")
            (root / "splits" / f"{domain}_{part}.txt").write_text("\n".join(lines) + "\n")


def test_domainnet_reads_the_official_test_lists_by_default(tmp_path) -> None:
    _domainnet(tmp_path)

    domains = _scan("domainnet", tmp_path)

    assert list(domains) == ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
    quickdraw = domains["quickdraw"]
    assert [p.name for p in quickdraw.paths] == ["test0.png", "test149.png", "test308.png", "test344.png"]
    assert _classes(quickdraw, LAYOUTS["domainnet"].classes) == [
        "aircraft carrier",
        "hot air balloon",
        "Eiffel Tower",
        "zigzag",
    ]
    assert len(_scan("domainnet", tmp_path, split="all")["real"].paths) == 8


def test_domainnet_without_its_test_list_says_which_file_and_where_it_comes_from(tmp_path) -> None:
    _domainnet(tmp_path)
    (tmp_path / "splits" / "sketch_test.txt").unlink()

    with pytest.raises(
        BenchmarkError,
        match=r"^DomainNet: no sketch_test.txt in \[.*\]; it comes with the benchmark \(https://ai.bu.edu/M3SDA/",
    ):
        _scan("domainnet", tmp_path)


def test_domainnet_class_list_is_prompt_ready_in_label_order() -> None:
    classes = LAYOUTS["domainnet"].classes
    assert len(classes) == 345 == len(set(classes))
    assert (classes[0], classes[149], classes[303], classes[327]) == (
        "aircraft carrier",
        "hot air balloon",
        "teddy bear",
        "t-shirt",
    )


# --- ImageCLEF-DA ------------------------------------------------------------------------


def test_imageclef_reads_labels_from_its_crlf_list_files(tmp_path) -> None:
    lists = {
        "c": [("c/113.hummingbird/113_0114.jpg", 2), ("c/159.people/159_0001.jpg", 11)],
        "i": [("i/n02691156_7563.JPEG", 0), ("i/n02958343_1.JPEG", 6)],
        "p": [("p/2008_006463.jpg", 0), ("p/2008_000001.jpg", 9)],
        "b": [("b/252.car-side-101/252_0446.jpg", 6)],
    }
    (tmp_path / "list").mkdir()
    for domain, rows in lists.items():
        for relative, _ in rows:
            _image(tmp_path / relative)
        (tmp_path / "list" / f"{domain}List.txt").write_bytes(
            "".join(f"{relative} {label}\r\n" for relative, label in rows).encode()
        )

    domains = _scan("imageclef_da", tmp_path)

    assert list(domains) == ["c", "i", "p"]  # the literature's three; "b" on request
    classes = LAYOUTS["imageclef_da"].classes
    assert _classes(domains["c"], classes) == ["bird", "people"]
    assert _classes(domains["i"], classes) == ["aeroplane", "car"]
    assert _classes(domains["p"], classes) == ["aeroplane", "monitor"]
    assert _classes(_scan("imageclef_da", tmp_path, domains=["b"])["b"], classes) == ["car"]


# --- VisDA-2017 --------------------------------------------------------------------------


def test_visda_reads_each_splits_image_list(tmp_path) -> None:
    _image(tmp_path / "validation" / "aeroplane" / "aeroplane_156496.jpg")
    _image(tmp_path / "validation" / "truck" / "truck_1.jpg")
    (tmp_path / "validation" / "image_list.txt").write_text("aeroplane/aeroplane_156496.jpg 0\ntruck/truck_1.jpg 11\n")
    _image(tmp_path / "test" / "trunk01" / "18ea5222dff37f4699dabaead5368368.jpg")
    (tmp_path / "test" / "image_list.txt").write_text("trunk01/18ea5222dff37f4699dabaead5368368.jpg 11\n")

    domains = _scan("visda2017", tmp_path)
    both = _scan("visda2017", tmp_path, domains=["validation", "test"])

    assert list(domains) == ["validation"]  # the real images the literature reports on
    classes = LAYOUTS["visda2017"].classes
    assert _classes(domains["validation"], classes) == ["aeroplane", "truck"]
    assert _classes(both["test"], classes) == ["truck"]


# --- class lists and aliases -------------------------------------------------------------


@pytest.mark.parametrize("benchmark", list(LAYOUTS))
def test_classes_may_name_a_benchmarks_class_list(benchmark) -> None:
    assert list(ClassNames.model_validate(benchmark)) == list(LAYOUTS[benchmark].classes)


def test_aliases_map_numbered_and_foreign_class_folders(tmp_path) -> None:
    _image(tmp_path / "photo" / "001" / "a.png")
    _image(tmp_path / "photo" / "Hund" / "b.png")
    _image(tmp_path / "photo" / "person" / "c.png")
    aliases = {"001": "bird", "Hund": "dog"}

    (photo,) = _scan("folders", tmp_path, ["bird", "dog", "person"], class_aliases=aliases).values()

    assert _classes(photo, ["bird", "dog", "person"]) == ["bird", "dog", "person"]


def test_aliases_rename_a_published_benchmarks_classes(tmp_path) -> None:
    kfold = _pacs(tmp_path)

    domains = _scan("pacs", kfold, ["puppy", "human"], class_aliases={"dog": "puppy", "person": "human"})

    assert _classes(domains["photo"], ["puppy", "human"]) == ["puppy", "human"]


def test_a_class_that_matches_nothing_names_the_folder_and_the_allowed_names(tmp_path) -> None:
    kfold = _pacs(tmp_path)

    with pytest.raises(BenchmarkError) as caught:
        _scan("pacs", kfold, ["dog", "cat"])
    assert str(caught.value) == (
        "ood_evaluation.benchmarks.pacs: class folder 'person' (in art_painting, cartoon, photo, sketch) is not in "
        "classes; allowed: ['dog', 'cat'] (case, '_' and '-' are ignored; ood_evaluation.benchmarks.pacs.class_aliases "
        "maps other names)"
    )
    with pytest.raises(BenchmarkError, match=r"class_aliases=\{'dog': 'wolf'\}: not classes of this run"):
        _scan("pacs", kfold, ["dog", "person"], class_aliases={"dog": "wolf"})


def test_every_class_folder_that_matches_nothing_is_named_at_once(tmp_path) -> None:
    _image(tmp_path / "photo" / "Hund" / "a.png")
    _image(tmp_path / "photo" / "ball" / "b.png")
    _image(tmp_path / "sketch" / "Katze" / "c.png")
    _image(tmp_path / "sketch" / "Hund" / "d.png")
    for folder in ("CALTECH", "LABELME", "PASCAL", "SUN"):
        _image(tmp_path / "jigen" / folder / "full" / "0" / "a.jpg")
        _image(tmp_path / "jigen" / folder / "test" / "3" / "b.jpg")

    with pytest.raises(BenchmarkError) as folders:
        _scan("folders", tmp_path, ["ball"], domains=["photo", "sketch"])
    with pytest.raises(BenchmarkError) as vlcs:
        _scan("vlcs", tmp_path / "jigen", ["bird"])

    assert str(folders.value).startswith(
        "ood_evaluation.benchmarks.folders: class folders 'Hund' (in photo, sketch), 'Katze' (in sketch) are not in "
        "classes; allowed: ['ball']"
    )
    assert str(vlcs.value).startswith(
        "ood_evaluation.benchmarks.vlcs: class folder 'dog' (in Caltech101, LabelMe, SUN09, VOC2007) is not in "
        "classes; allowed: ['bird']"
    )
