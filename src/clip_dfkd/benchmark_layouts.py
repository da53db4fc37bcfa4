"""The published domain-shift benchmarks as their users have them on disk.

Each :class:`PublishedLayout` knows a benchmark's domains and classes as published, its class
names as prompts read them (``hot_air_balloon`` → "hot air balloon"), and how to list a
domain's images with their benchmark class: from the official list files where the benchmark
publishes them, from class folders otherwise. Formats were looked up in the benchmarks'
official releases and the loaders the field uses (DomainBed, Dassl, Transfer-Learning-Library,
the VisDA-2017 repository); ``docs/benchmarks.md`` cites the sources.

This module is data and file listing only; matching benchmark classes to a run's ``classes``
happens in :mod:`clip_dfkd.benchmarks`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from clip_dfkd.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
NOT_AN_IMAGE = "not an image file"
OUTSIDE_CLASS_FOLDERS = "not inside a class folder"
LISTED_BUT_MISSING = "listed in {list_file} but not on disk"


class BenchmarkError(UserError, ValueError):
    """A benchmark folder that does not match its layout or the run's class list."""


@dataclass
class ListedImages:
    """A domain's images, each with its class as the benchmark names it (a class folder's
    name, or the class that a list file's label number stands for), and the files of the
    domain that are not evaluated, with the reason."""

    paths: list[Path] = field(default_factory=list)
    benchmark_classes: list[str] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    class_dirs: list[Path] | None = None
    """The class folders read; None where a list file gives the classes."""


def visible(path: Path) -> bool:
    """Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``, ``._x``) are never read."""
    return not path.name.startswith(".")


def visible_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` at any depth, sorted, without hidden files and folders.

    Symbolic links to folders are followed (benchmarks are often assembled from links), each
    real folder once, so a link back to a parent cannot make the walk endless.
    """
    found, walked = [], set()
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in walked:
            subdirectories.clear()
            continue
        walked.add(real)
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
        found += [Path(directory, f) for f in files if not f.startswith(".")]
    return sorted(found)


def read_class_folders(domain_dir: Path, class_dirs: list[Path] | None = None) -> ListedImages:
    """``<domain_dir>/<class>/<images, at any depth>``; files beside the class folders and
    files that are not images are skipped with the reason."""
    listed = ListedImages()
    if class_dirs is None:
        entries = sorted(p for p in domain_dir.iterdir() if visible(p))
        listed.skipped += [(p, OUTSIDE_CLASS_FOLDERS) for p in entries if not p.is_dir()]
        class_dirs = [p for p in entries if p.is_dir()]
    listed.class_dirs = class_dirs
    for class_dir in class_dirs:
        for path in visible_files(class_dir):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                listed.paths.append(path)
                listed.benchmark_classes.append(class_dir.name)
            else:
                listed.skipped.append((path, NOT_AN_IMAGE))
    return listed


def read_list_file(
    list_file: Path, relative_to: Path, classes: list[str], first_label: int, class_from_folder: bool = False
) -> ListedImages:
    """A published list: one ``<relative path> <label number>`` per line, the path relative
    to ``relative_to``; label ``first_label`` is ``classes[0]``, or, with
    ``class_from_folder``, the listed path's folder names the class. Tolerates CRLF line
    endings (ImageCLEF-DA's lists have them) and spaces inside paths (the label is the last
    field). A listed file that is not on disk, or a label outside the class list, is skipped
    with the reason rather than failing the whole benchmark."""
    listed = ListedImages()
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        relative, _, label = line.strip().rpartition(" ")
        path = relative_to / relative.strip()
        try:
            index = int(label) - first_label
        except ValueError:
            index = -1
        last_label = first_label + len(classes) - 1
        problem = f"{list_file.name} line {number}: label {label!r} is outside {first_label}..{last_label}"
        if class_from_folder:
            index = classes.index(path.parent.name) if path.parent.name in classes else -1
            problem = f"{list_file.name} line {number}: folder {path.parent.name!r} is not a class of the benchmark"
        if not 0 <= index < len(classes):
            listed.skipped.append((path, problem))
        elif not path.is_file():
            listed.skipped.append((path, LISTED_BUT_MISSING.format(list_file=list_file.name)))
        else:
            listed.paths.append(path)
            listed.benchmark_classes.append(classes[index])
    return listed


@dataclass(frozen=True)
class PublishedLayout:
    """How one published benchmark lies on disk.

    ``domains`` maps each published domain name to the folder names it is found under in the
    distributions people use (DomainBed renames nothing, Transfer-Learning-Library writes
    ``Real_World``, JiGen upper-cases VLCS's domains, other copies lower-case them), matched
    ignoring case. ``folder_names`` are the class folders (or list-file class words) in label
    order and ``classes`` the same classes as prompts read them. ``read`` lists one domain's
    images for a split (``test``: the official test list where there is one, else every image;
    ``all``: every image). ``list_entries`` name (as ``fnmatch`` patterns) the files and
    folders at the root that hold the official lists; any other entry of the root that is not
    a domain folder is listed as skipped.
    """

    title: str
    published_at: str
    layout: str
    domains: dict[str, tuple[str, ...]]
    folder_names: tuple[str, ...]
    classes: tuple[str, ...]
    read: Callable[[PublishedLayout, Path, Path, str, str], ListedImages]
    default_domains: tuple[str, ...] | None = None
    list_entries: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        assert len(self.folder_names) == len(self.classes), self.title

    def class_of_folder(self, folder: str) -> str | None:
        """The prompt-ready class a folder (or list word) of this benchmark stands for."""
        return dict(zip(self.folder_names, self.classes, strict=True)).get(folder)

    def domain_dir(self, root: Path, domain: str) -> Path | None:
        """The folder of ``domain`` under ``root``: its first name found as written, else the
        first found in another case."""
        for folder in self.domains[domain]:
            if (root / folder).is_dir():
                return root / folder
        folders = {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir() and visible(p)}
        return next((folders[name.lower()] for name in self.domains[domain] if name.lower() in folders), None)

    def is_domain_folder(self, name: str) -> bool:
        """Whether a folder called ``name`` is one of this benchmark's domains, in any case."""
        return any(name.lower() == folder.lower() for folders in self.domains.values() for folder in folders)

    def holds_lists(self, name: str) -> bool:
        """Whether the root entry ``name`` is where the benchmark keeps its official lists."""
        return any(fnmatch(name, pattern) for pattern in self.list_entries)


def _find_list(name: str, places: list[Path]) -> Path | None:
    return next((place / name for place in places if (place / name).is_file()), None)


def _missing_list(layout: PublishedLayout, name: str, places: list[Path]) -> BenchmarkError:
    return BenchmarkError(
        f"{layout.title}: no {name} in {[str(p) for p in places]}; it comes with the benchmark ({layout.published_at})"
    )


PACS_LIST_FOLDER = "splits"
DOMAINNET_LIST_FOLDERS = ("splits", "image_list", "txt")
IMAGECLEF_LIST_FOLDER = "list"


def _read_pacs(layout: PublishedLayout, root: Path, domain_dir: Path, domain: str, split: str) -> ListedImages:
    # PACS's official "<domain>_test_kfold.txt" lists the whole domain, so both splits read
    # it when it is there, and the class folders otherwise. The class is taken from the
    # listed path's class folder: copies of the 1-based lists circulate with a stray label 0.
    places = [root, root / PACS_LIST_FOLDER, root.parent / PACS_LIST_FOLDER]
    list_file = _find_list(f"{domain}_test_kfold.txt", places)
    if list_file is None:
        return read_class_folders(domain_dir)
    return read_list_file(list_file, root, list(layout.folder_names), first_label=1, class_from_folder=True)


def _read_vlcs(layout: PublishedLayout, root: Path, domain_dir: Path, domain: str, split: str) -> ListedImages:
    # DomainBed: <domain>/<class>/; JiGen and Dassl: <DOMAIN>/{full,train,crossval,test}/<0-4>/,
    # where "full" is train + crossval and "test" the official test part.
    if not (domain_dir / "test").is_dir():
        return read_class_folders(domain_dir)
    parts = ["test"] if split == "test" else ["full", "test"]
    class_dirs = sorted(p for part in parts for p in (domain_dir / part).iterdir() if p.is_dir() and visible(p))
    listed = read_class_folders(domain_dir, class_dirs)
    # JiGen numbers the class folders in label order.
    numbered = {str(index): folder for index, folder in enumerate(layout.folder_names)}
    listed.benchmark_classes = [numbered.get(word, word) for word in listed.benchmark_classes]
    return listed


def _read_folders(layout: PublishedLayout, root: Path, domain_dir: Path, domain: str, split: str) -> ListedImages:
    return read_class_folders(domain_dir)


def _read_domainnet(layout: PublishedLayout, root: Path, domain_dir: Path, domain: str, split: str) -> ListedImages:
    places = [root, *(root / folder for folder in DOMAINNET_LIST_FOLDERS)]
    listed = ListedImages()
    for part in ["test"] if split == "test" else ["train", "test"]:
        name = f"{domain}_{part}.txt"
        list_file = _find_list(name, places)
        if list_file is None:
            raise _missing_list(layout, name, places)
        more = read_list_file(list_file, root, list(layout.folder_names), first_label=0)
        listed.paths += more.paths
        listed.benchmark_classes += more.benchmark_classes
        listed.skipped += more.skipped
    return listed


def _read_imageclef(layout: PublishedLayout, root: Path, domain_dir: Path, domain: str, split: str) -> ListedImages:
    # The folders do not carry the class words (numbered Caltech-256 folders, flat ImageNet
    # and VOC files): the list file is the only source of labels.
    places = [root / IMAGECLEF_LIST_FOLDER]
    list_file = _find_list(f"{domain}List.txt", places)
    if list_file is None:
        raise _missing_list(layout, f"{domain}List.txt", places)
    return read_list_file(list_file, root, list(layout.folder_names), first_label=0)


def _read_visda(layout: PublishedLayout, root: Path, domain_dir: Path, domain: str, split: str) -> ListedImages:
    # Paths are relative to the split folder; the test split's images sit in "trunk" folders,
    # so the label number, not the folder, is the class.
    list_file = domain_dir / "image_list.txt"
    if not list_file.is_file():
        raise _missing_list(layout, "image_list.txt", [domain_dir])
    return read_list_file(list_file, domain_dir, list(layout.folder_names), first_label=0)


def _prompt_words(folder: str) -> str:
    """``Alarm_Clock`` → "alarm clock"; ``teddy-bear`` → "teddy bear"; all-capital words
    (``TV``) keep their case."""
    words = re.split(r"[_\-\s]+", folder)
    return " ".join(word if word.isupper() and len(word) > 1 else word.lower() for word in words if word)


OFFICEHOME_FOLDERS = (
    "Alarm_Clock Backpack Batteries Bed Bike Bottle Bucket Calculator Calendar Candles Chair Clipboards "
    "Computer Couch Curtains Desk_Lamp Drill Eraser Exit_Sign Fan File_Cabinet Flipflops Flowers Folder Fork "
    "Glasses Hammer Helmet Kettle Keyboard Knives Lamp_Shade Laptop Marker Monitor Mop Mouse Mug Notebook Oven "
    "Pan Paper_Clip Pen Pencil Postit_Notes Printer Push_Pin Radio Refrigerator Ruler Scissors Screwdriver Shelf "
    "Sink Sneakers Soda Speaker Spoon TV Table Telephone ToothBrush Toys Trash_Can Webcam"
).split()
# Folders whose words a prompt should not read as written.
OFFICEHOME_PROMPT_WORDS = {"Flipflops": "flip flops", "Postit_Notes": "sticky notes", "ToothBrush": "toothbrush"}

# DomainNet's official label order: a sort that ignores case, "_" and "-".
DOMAINNET_FOLDERS = (
    "aircraft_carrier airplane alarm_clock ambulance angel animal_migration ant anvil apple arm asparagus axe "
    "backpack banana bandage barn baseball baseball_bat basket basketball bat bathtub beach bear beard bed bee "
    "belt bench bicycle binoculars bird birthday_cake blackberry blueberry book boomerang bottlecap bowtie "
    "bracelet brain bread bridge broccoli broom bucket bulldozer bus bush butterfly cactus cake calculator "
    "calendar camel camera camouflage campfire candle cannon canoe car carrot castle cat ceiling_fan cello "
    "cell_phone chair chandelier church circle clarinet clock cloud coffee_cup compass computer cookie cooler "
    "couch cow crab crayon crocodile crown cruise_ship cup diamond dishwasher diving_board dog dolphin donut "
    "door dragon dresser drill drums duck dumbbell ear elbow elephant envelope eraser eye eyeglasses face fan "
    "feather fence finger fire_hydrant fireplace firetruck fish flamingo flashlight flip_flops floor_lamp "
    "flower flying_saucer foot fork frog frying_pan garden garden_hose giraffe goatee golf_club grapes grass "
    "guitar hamburger hammer hand harp hat headphones hedgehog helicopter helmet hexagon hockey_puck "
    "hockey_stick horse hospital hot_air_balloon hot_dog hot_tub hourglass house house_plant hurricane "
    "ice_cream jacket jail kangaroo key keyboard knee knife ladder lantern laptop leaf leg light_bulb lighter "
    "lighthouse lightning line lion lipstick lobster lollipop mailbox map marker matches megaphone mermaid "
    "microphone microwave monkey moon mosquito motorbike mountain mouse moustache mouth mug mushroom nail "
    "necklace nose ocean octagon octopus onion oven owl paintbrush paint_can palm_tree panda pants paper_clip "
    "parachute parrot passport peanut pear peas pencil penguin piano pickup_truck picture_frame pig pillow "
    "pineapple pizza pliers police_car pond pool popsicle postcard potato power_outlet purse rabbit raccoon "
    "radio rain rainbow rake remote_control rhinoceros rifle river roller_coaster rollerskates sailboat "
    "sandwich saw saxophone school_bus scissors scorpion screwdriver sea_turtle see_saw shark sheep shoe "
    "shorts shovel sink skateboard skull skyscraper sleeping_bag smiley_face snail snake snorkel snowflake "
    "snowman soccer_ball sock speedboat spider spoon spreadsheet square squiggle squirrel stairs star steak "
    "stereo stethoscope stitches stop_sign stove strawberry streetlight string_bean submarine suitcase sun "
    "swan sweater swing_set sword syringe table teapot teddy-bear telephone television tennis_racquet tent "
    "The_Eiffel_Tower The_Great_Wall_of_China The_Mona_Lisa tiger toaster toe toilet tooth toothbrush "
    "toothpaste tornado tractor traffic_light train tree triangle trombone truck trumpet t-shirt umbrella "
    "underwear van vase violin washing_machine watermelon waterslide whale wheel windmill wine_bottle "
    "wine_glass wristwatch yoga zebra zigzag"
).split()
DOMAINNET_PROMPT_WORDS = {
    "The_Eiffel_Tower": "Eiffel Tower",
    "The_Great_Wall_of_China": "Great Wall of China",
    "The_Mona_Lisa": "Mona Lisa",
    "t-shirt": "t-shirt",
}

IMAGECLEF_CLASSES = ("aeroplane bike bird boat bottle bus car dog horse monitor motorbike people").split()
VISDA_CLASSES = ("aeroplane bicycle bus car horse knife motorcycle person plant skateboard train truck").split()


def _prompt_names(folders: list[str], exceptions: dict[str, str]) -> tuple[str, ...]:
    return tuple(exceptions.get(folder) or _prompt_words(folder) for folder in folders)


LAYOUTS: dict[str, PublishedLayout] = {
    "pacs": PublishedLayout(
        title="PACS",
        published_at="https://domaingeneralization.github.io (Li et al., ICCV 2017)",
        layout="<root>/<domain>/<class>/<images> (the download's kfold/ folder), with the official "
        "<domain>_test_kfold.txt in <root>, <root>/splits or <root>/../splits when you have them",
        domains={d: (d,) for d in ("art_painting", "cartoon", "photo", "sketch")},
        folder_names=("dog", "elephant", "giraffe", "guitar", "horse", "house", "person"),
        classes=("dog", "elephant", "giraffe", "guitar", "horse", "house", "person"),
        read=_read_pacs,
        list_entries=("*_test_kfold.txt", PACS_LIST_FOLDER),
    ),
    "vlcs": PublishedLayout(
        title="VLCS",
        published_at="https://github.com/facebookresearch/DomainBed (Fang et al., ICCV 2013)",
        layout="<root>/<domain>/<class>/<images> (DomainBed), "
        "or <root>/<DOMAIN>/{full,test}/<0-4>/<images> (JiGen, Dassl)",
        domains={
            "Caltech101": ("Caltech101", "CALTECH"),
            "LabelMe": ("LabelMe", "LABELME"),
            "SUN09": ("SUN09", "SUN"),
            "VOC2007": ("VOC2007", "PASCAL"),
        },
        folder_names=("bird", "car", "chair", "dog", "person"),
        classes=("bird", "car", "chair", "dog", "person"),
        read=_read_vlcs,
    ),
    "officehome": PublishedLayout(
        title="OfficeHome",
        published_at="https://www.hemanthdv.org/officeHomeDataset.html (Venkateswara et al., CVPR 2017)",
        layout="<root>/<domain>/<class>/<images> (the download's OfficeHomeDataset_10072016/ folder)",
        domains={
            "Art": ("Art",),
            "Clipart": ("Clipart",),
            "Product": ("Product",),
            "Real World": ("Real World", "Real_World"),
        },
        folder_names=tuple(OFFICEHOME_FOLDERS),
        classes=_prompt_names(OFFICEHOME_FOLDERS, OFFICEHOME_PROMPT_WORDS),
        read=_read_folders,
    ),
    "domainnet": PublishedLayout(
        title="DomainNet",
        published_at="https://ai.bu.edu/M3SDA/ (Peng et al., ICCV 2019)",
        layout="<root>/<domain>/<class>/<images> with the official <domain>_test.txt (and <domain>_train.txt "
        "for split=all) in <root>, <root>/splits, <root>/image_list or <root>/txt",
        domains={d: (d,) for d in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")},
        folder_names=tuple(DOMAINNET_FOLDERS),
        classes=_prompt_names(DOMAINNET_FOLDERS, DOMAINNET_PROMPT_WORDS),
        read=_read_domainnet,
        list_entries=("*_train.txt", "*_test.txt", *DOMAINNET_LIST_FOLDERS),
    ),
    "imageclef_da": PublishedLayout(
        title="ImageCLEF-DA",
        published_at="https://github.com/thuml/CDAN (ImageCLEF 2014 domain adaptation challenge)",
        layout="<root>/{b,c,i,p}/<images> with the list files <root>/list/{b,c,i,p}List.txt",
        domains={d: (d,) for d in ("b", "c", "i", "p")},
        folder_names=tuple(IMAGECLEF_CLASSES),
        classes=tuple(IMAGECLEF_CLASSES),
        read=_read_imageclef,
        list_entries=(IMAGECLEF_LIST_FOLDER,),
        # Bing ("b") is in the lists but rarely reported; the literature's domains come first.
        default_domains=("c", "i", "p"),
    ),
    "visda2017": PublishedLayout(
        title="VisDA-2017",
        published_at="https://github.com/VisionLearningGroup/taskcv-2017-public (classification track)",
        layout="<root>/{train,validation,test}/image_list.txt and the images it lists",
        domains={d: (d,) for d in ("train", "validation", "test")},
        folder_names=tuple(VISDA_CLASSES),
        classes=tuple(VISDA_CLASSES),
        read=_read_visda,
        # The real images the literature reports on; "train" (152k synthetic renders) on request.
        default_domains=("validation",),
    ),
}
