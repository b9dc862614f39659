"""A stand-in for TouchDesigner's `td` module, so td_components can be tested outside TouchDesigner.

It follows the documented Python API (docs.derivative.ca: OP, COMP, TOP, DAT, Par, ParGroup,
Page, Script TOP, Execute DAT, Parameter Execute DAT, Extensions, MOD) for the parts the
component uses, and refuses what the documented API lacks: an unknown parameter name raises
AttributeError, a custom parameter name must be capitalised, a menu takes only its own
entries, addWarning works only while the operator cooks, copyNumpyArray only while cooking
or with Modify Outside of Cook on. What it models of TouchDesigner's behaviour:

- Custom pages: `appendCustomPage`, then `appendFloat/Int` (size 1-4; size > 1 names the
  parameters Name1, Name2, ...), `appendStr/Toggle/Pulse/Menu/File/Folder/DAT/Header`, each
  returning a ParGroup (index it for the Par). Setting `op.par.X = v` sets the value; a
  parameter's `expr`, when set, is evaluated instead, with `me` the parameter's OP.
- Parameter Execute DATs watching an OP call onValueChange(par, prev) when a watched
  parameter changes and onPulse(par) when one is pulsed.
- A DAT's `module` runs its text as a module with `me`, `op` and `parent` bound to the DAT,
  and `import name` finds a DAT of that name in the DAT's component first, then sys.path.
  Such modules are not put in sys.modules (nothing documents that TouchDesigner does).
  With a `file` and `syncfile` on, the text is the file's.
- Extensions: `ext0object` is Python text evaluated with `me` = the COMP when
  `reinitextensions` is pulsed; `ext0promote` makes capitalised members reachable on the
  COMP; `ext.Name` finds the extension on the OP or a parent. onInitTD runs at the end of
  the next frame, onDestroyTD before a re-init and when the COMP is destroyed.
- TOPs hold float32 RGBA images, rows bottom to top (TouchDesigner's origin is bottom
  left). `numpyArray(delayed=True)` returns what was current at the previous call (None the
  first time). An In TOP shows its COMP's first input; a Fit TOP resizes to a custom
  resolution ('fitoutside': cover, centre-crop); a Script TOP shows its last copyNumpyArray.
- Creating a Script TOP also creates its docked callbacks DAT, named '<name>_callbacks'.
- `COMP.save(path)` writes the component with everything inside it (a stand-in for a .tox:
  JSON, not TouchDesigner's format): operators, parameter values and expressions, custom
  pages, DAT text and table rows, wiring inside. `COMP.loadTox(path)` makes a copy of a
  saved component inside this COMP (numbered when its name is taken; wiring to outside it
  is not kept) and initialises its extensions, as loading a .tox does.
- `app.binFolder`: the folder of TouchDesigner's binaries; here the running Python's.

Test drivers that are not TouchDesigner API: `install()` (a fresh project at /project1,
registered as sys.modules['td']), `run_frame()` (one frame: Execute DATs' onFrameStart,
then pending onInitTD calls), `quit_project()` (Execute DATs' onExit), `reopen_project()`
(the saved project opened again in a new session: DAT modules made afresh, extensions
initialised anew).
"""

from __future__ import annotations

import builtins
import fnmatch
import json
import re
import sys
import types
from pathlib import Path

import numpy as np

_CUSTOM_NAME = re.compile(r"[A-Z][a-z0-9]*")


# ----------------------------------------------------------------------------- parameters


class Par:
    """One parameter. `val` is its constant value; eval() its value in the parameter's type."""

    def __init__(self, owner: OP, name: str, style: str, *, label: str | None = None, default=None,
                 menu: tuple[str, ...] = (), page: Page | None = None):
        self.owner = owner
        self.name = name
        self.style = style  # Float, Int, Str, Toggle, Pulse, Menu, File, Folder, DAT, OP, TOP, Header, Python
        self.label = label or name
        self.page = page
        self.menuNames = list(menu)
        self.menuLabels = list(menu)
        self.min = self.normMin = 0.0
        self.max = self.normMax = 1.0
        self.clampMin = self.clampMax = False
        self.readOnly = False
        self.help = ""
        self._val = _typed(style, default)
        self.default = self._val
        self.expr = ""  # a Python expression; when set, eval() evaluates it (expression mode)

    @property
    def isCustom(self) -> bool:
        return self.page is not None

    @property
    def val(self):
        return self._val

    @val.setter
    def val(self, value) -> None:
        if self.style == "Pulse":
            raise ValueError(f"{self.name} is a pulse parameter: use pulse()")
        value = _typed(self.style, value)
        if self.style == "Menu" and value not in self.menuNames:
            raise ValueError(f"{value!r} is not an entry of menu {self.name} ({', '.join(self.menuNames)})")
        if self.style in ("Float", "Int"):
            if self.clampMin:
                value = max(value, _typed(self.style, self.min))
            if self.clampMax:
                value = min(value, _typed(self.style, self.max))
        previous, self._val = self._val, value
        if value != previous:
            _world.parameter_changed(self, previous)

    def eval(self):
        if self.expr:
            owner = self.owner
            return eval(self.expr, {"me": owner, "op": owner.op, "parent": owner.parent})
        if self.style in ("DAT", "OP", "TOP"):
            return self.owner.op(self._val) if self._val else None
        return self._val

    def pulse(self) -> None:
        if self.style != "Pulse":
            raise ValueError(f"{self.name} is not a pulse parameter")
        _world.parameter_pulsed(self)

    def __repr__(self) -> str:
        return f"<Par {self.owner.path}:{self.name}={self._val!r}>"


def _typed(style: str, value):
    if style == "Float":
        return float(value or 0.0)
    if style == "Int":
        return int(value or 0)
    if style in ("Toggle", "Pulse"):
        return bool(value)
    if style in ("DAT", "OP", "TOP"):
        return value.path if isinstance(value, OP) else str(value or "")
    return "" if value is None else str(value)


class ParGroup(tuple):
    """The parameters drawn on one line (one Par, or Name1..NameN for a size above 1)."""


class ParCollection:
    """`op.par`: parameters by name. Assigning to a name sets that parameter's value."""

    def __init__(self, owner: OP):
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_pars", {})

    def __getattr__(self, name: str) -> Par:
        try:
            return self._pars[name]
        except KeyError:
            raise AttributeError(f"{self._owner.opType} {self._owner.path} has no parameter {name!r}") from None

    def __setattr__(self, name: str, value) -> None:
        getattr(self, name).val = value

    def __getitem__(self, name: str) -> Par | None:
        return self._pars.get(name)


class Page:
    """A custom parameter page; its append methods create parameters on the page's OP."""

    def __init__(self, owner: OP, name: str):
        self.owner = owner
        self.name = name
        self.parGroups: list[ParGroup] = []

    @property
    def pars(self) -> list[Par]:
        return [par for group in self.parGroups for par in group]

    def appendFloat(self, name, label=None, size=1, order=None, replace=True):
        return self._append(name, "Float", label, size, replace)

    def appendInt(self, name, label=None, size=1, order=None, replace=True):
        return self._append(name, "Int", label, size, replace)

    def appendStr(self, name, label=None, order=None, replace=True):
        return self._append(name, "Str", label, 1, replace)

    def appendToggle(self, name, label=None, order=None, replace=True):
        return self._append(name, "Toggle", label, 1, replace)

    def appendPulse(self, name, label=None, order=None, replace=True):
        return self._append(name, "Pulse", label, 1, replace)

    def appendMenu(self, name, label=None, order=None, replace=True):
        return self._append(name, "Menu", label, 1, replace)

    def appendFile(self, name, label=None, order=None, replace=True):
        return self._append(name, "File", label, 1, replace)

    def appendFolder(self, name, label=None, order=None, replace=True):
        return self._append(name, "Folder", label, 1, replace)

    def appendDAT(self, name, label=None, order=None, replace=True):
        return self._append(name, "DAT", label, 1, replace)

    def appendHeader(self, name, label=None, order=None, replace=True):
        return self._append(name, "Header", label, 1, replace)

    def _append(self, name: str, style: str, label: str | None, size: int, replace: bool) -> ParGroup:
        if not _CUSTOM_NAME.fullmatch(name):
            raise ValueError(f"custom parameter names are a capital letter then lower case and digits: {name!r}")
        if not 1 <= size <= 4:
            raise ValueError(f"size must be 1 to 4, got {size}")
        names = [name] if size == 1 else [f"{name}{i}" for i in range(1, size + 1)]
        pars = self.owner.par._pars
        for par_name in names:
            if par_name in pars:
                if not replace:
                    raise ValueError(f"parameter {par_name} exists")
                _remove_par(pars[par_name])
        group = ParGroup(Par(self.owner, n, style, label=label, page=self) for n in names)
        for par in group:
            pars[par.name] = par
        self.parGroups.append(group)
        return group


def _remove_par(par: Par) -> None:
    del par.owner.par._pars[par.name]
    for group in par.page.parGroups:
        if par in group:
            par.page.parGroups.remove(group)
            return


# ------------------------------------------------------------------------------ operators


class Connector:
    """An input connector; connect() takes the OP whose first output feeds it."""

    def __init__(self, owner: OP):
        self.owner = owner
        self.source: OP | None = None

    def connect(self, source: OP) -> None:
        self.source = source

    def disconnect(self) -> None:
        self.source = None


class OP:
    opType = ""
    isCOMP = False
    # Built-in parameters: name -> (style, default, menu entries).
    BUILTIN: dict[str, tuple] = {}

    def __init__(self, parent: COMP | None, name: str):
        self.name = name
        self._parent = parent
        self.valid = True
        self.nodeX = self.nodeY = 0
        self.viewer_opened = False
        self.par = ParCollection(self)
        for par_name, (style, default, menu) in self.BUILTIN.items():
            self.par._pars[par_name] = Par(self, par_name, style, default=default, menu=menu)
        self.inputConnectors = [Connector(self)]
        self.customPages: list[Page] = []
        self._cooking = False
        self.warnings_added: list[str] = []

    @property
    def path(self) -> str:
        if self._parent is None:
            return "/"
        return f"{self._parent.path.rstrip('/')}/{self.name}"

    def parent(self, n: int = 1) -> COMP | None:
        node = self
        for _ in range(n):
            node = node._parent
            if node is None:
                return None
        return node

    def op(self, path: str) -> OP | None:
        """Relative to the inside of this OP when it is a COMP, else to its parent, as TouchDesigner does."""
        start = self if self.isCOMP else self._parent
        return _find(start, path)

    @property
    def inputs(self) -> list[OP]:
        return [c.source for c in self.inputConnectors if c.source is not None]

    def appendCustomPage(self, name: str) -> Page:
        page = Page(self, name)
        self.customPages.append(page)
        return page

    @property
    def ext(self) -> _ExtSearch:
        return _ExtSearch(self)

    def cook(self, force: bool = False, recurse: bool = False) -> None:
        self._cooking = True
        self.warnings_added = []
        try:
            self._cook()
        finally:
            self._cooking = False

    def _cook(self) -> None:
        pass

    def _created(self) -> None:
        pass

    def addWarning(self, msg: str) -> None:
        if not self._cooking:
            raise RuntimeError("addWarning is only valid while the operator is cooking")
        self.warnings_added.append(msg)

    def openViewer(self, unique: bool = False, borders: bool = True) -> None:
        self.viewer_opened = True

    def destroy(self) -> None:
        self.valid = False
        if self._parent is not None:
            del self._parent._children[self.name]

    def _description(self) -> dict:
        """Everything a .tox keeps of this OP (and of what is inside it, for a COMP)."""
        builtin = {par.name: _par_state(par) for par in self.par._pars.values() if not par.isCustom}
        pages = [{"name": page.name, "groups": [[{**_par_state(par), **_par_looks(par)} for par in group]
                                                for group in page.parGroups]}
                 for page in self.customPages]
        return {"type": self.opType, "name": self.name, "node": [self.nodeX, self.nodeY], "pars": builtin,
                "custom_pages": pages,
                "inputs": [c.source.name if c.source is not None and c.source._parent is self._parent else None
                           for c in self.inputConnectors]}

    def _restore(self, description: dict) -> None:
        self.nodeX, self.nodeY = description["node"]
        for name, state in description["pars"].items():
            par = self.par[name]
            if par is not None:
                par._val, par.expr = state["val"], state["expr"]
        for saved in description["custom_pages"]:
            page = self.appendCustomPage(saved["name"])
            for saved_group in saved["groups"]:
                group = ParGroup(Par(self, state["name"], state["style"], page=page) for state in saved_group)
                for par, state in zip(group, saved_group):
                    for key, value in state.items():
                        if key not in ("name", "style", "val"):
                            setattr(par, key, value)
                    par._val = state["val"]
                    self.par._pars[par.name] = par
                page.parGroups.append(group)

    def __repr__(self) -> str:
        return f"<{self.opType} {self.path}>"


def _find(start: OP | None, path: str) -> OP | None:
    if start is None or not path:
        return None
    node = _world.root if path.startswith("/") else start
    for part in path.strip("/").split("/"):
        if part in ("", "."):
            continue
        node = node._parent if part == ".." else (node._children.get(part) if node.isCOMP else None)
        if node is None:
            return None
    return node


class _ExtSearch:
    """`op.ext`: the extensions of this OP or its nearest parent COMP that has one by that name."""

    def __init__(self, start: OP):
        self._start = start

    def __getattr__(self, name: str):
        node = self._start
        while node is not None:
            if node.isCOMP and name in node._extensions:
                return node._extensions[name]
            node = node._parent
        raise AttributeError(f"no extension {name!r} on {self._start.path} or its parents")


# ---------------------------------------------------------------------------------- COMPs


class COMP(OP):
    isCOMP = True
    BUILTIN = {
        "ext0object": ("Python", "", ()),
        "ext0name": ("Str", "", ()),
        "ext0promote": ("Toggle", False, ()),
        "initextonstart": ("Toggle", True, ()),
        "reinitextensions": ("Pulse", False, ()),
    }

    def __init__(self, parent, name):
        super().__init__(parent, name)
        self._children: dict[str, OP] = {}
        self._extensions: dict[str, object] = {}
        self._promoted: object | None = None
        self.saved_to: list[str] = []

    @property
    def children(self) -> list[OP]:
        return list(self._children.values())

    def create(self, op_type, name: str) -> OP:
        cls = globals()[op_type] if isinstance(op_type, str) else op_type
        if name in self._children:
            raise ValueError(f"{self.path} already has an operator named {name}")
        node = cls(self, name)
        self._children[name] = node
        node._created()
        return node

    def save(self, filepath: str, createFolders: bool = False) -> str:
        """Writes the component and everything inside it (a stand-in for a .tox); returns the path."""
        path = Path(filepath)
        if createFolders:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fake_td_tox": 1, "comp": self._description()}, indent=1))
        self.saved_to.append(str(path))
        return str(path)

    def loadTox(self, filepath: str, unwired: bool = False, pattern=None, password=None) -> COMP:
        """Load the component saved in filepath into this COMP, and return it."""
        saved = json.loads(Path(filepath).read_text())
        if saved.get("fake_td_tox") != 1:
            raise ValueError(f"{filepath} is not a component saved by this td")
        description = saved["comp"]
        name, number = description["name"], 0
        while (f"{name}{number}" if number else name) in self._children:
            number += 1
        comp = _rebuild(self, description, f"{name}{number}" if number else name)
        for node in _walk(comp):
            if node.isCOMP and node.par.ext0object.val:
                node._initialize_extensions()
        return comp

    def _description(self) -> dict:
        return {**super()._description(), "children": [child._description() for child in self.children]}

    def destroy(self) -> None:
        for child in self.children:
            child.destroy()
        self._destroy_extensions()
        super().destroy()

    def _initialize_extensions(self) -> None:
        self._destroy_extensions()
        source = self.par.ext0object.val
        if not source:
            return
        namespace = {"me": self, "op": self.op, "parent": self.parent}
        extension = eval(source, namespace)
        name = self.par.ext0name.val or type(extension).__name__
        self._extensions[name] = extension
        self._promoted = extension if self.par.ext0promote.val else None
        if hasattr(extension, "onInitTD"):
            _world.pending_inits.append(extension)

    def _destroy_extensions(self) -> None:
        for extension in self._extensions.values():
            if hasattr(extension, "onDestroyTD"):
                extension.onDestroyTD()
        self._extensions.clear()
        self._promoted = None

    def __getattr__(self, name: str):
        promoted = self.__dict__.get("_promoted")
        if promoted is not None and name[:1].isupper():
            return getattr(promoted, name)
        raise AttributeError(f"{type(self).__name__} {self.__dict__.get('name')!r} has no attribute {name!r}")


class baseCOMP(COMP):
    opType = "baseCOMP"


def _par_state(par: Par) -> dict:
    return {"name": par.name, "style": par.style, "val": par._val, "expr": par.expr}


def _par_looks(par: Par) -> dict:
    """A custom parameter's settings besides its value."""
    return {key: getattr(par, key) for key in ("label", "default", "menuNames", "menuLabels", "min", "max",
                                               "normMin", "normMax", "clampMin", "clampMax", "help", "readOnly")}


def _rebuild(parent: COMP, description: dict, name: str) -> OP:
    """An OP (and what was inside it) as saved, made without the side effects of creating one."""
    node = globals()[description["type"]](parent, name)
    parent._children[name] = node
    node._restore(description)
    if node.isCOMP:
        for child in description["children"]:
            _rebuild(node, child, child["name"])
        for child in description["children"]:
            for connector, source in zip(node._children[child["name"]].inputConnectors, child["inputs"]):
                if source is not None:
                    connector.connect(node._children[source])
    return node


def _walk(comp: COMP):
    yield comp
    for child in comp.children:
        if child.isCOMP:
            yield from _walk(child)
        else:
            yield child


# ----------------------------------------------------------------------------------- TOPs

_COMMON_TOP_PARS = {
    "outputresolution": ("Menu", "useinput", ("useinput", "eighth", "quarter", "half", "2x", "4x", "8x",
                                              "fit", "limit", "custom", "parpanel")),
    "resolutionw": ("Int", 256, ()),
    "resolutionh": ("Int", 256, ()),
}


class TOP(OP):
    BUILTIN = _COMMON_TOP_PARS

    def __init__(self, parent, name):
        super().__init__(parent, name)
        self._previous_download: np.ndarray | None = None

    def _image(self) -> np.ndarray | None:
        """float32 [h, w, 4], rows bottom to top; None while there is nothing to show."""
        return None

    def numpyArray(self, delayed: bool = False, writable: bool = False) -> np.ndarray | None:
        current = self._image()
        current = None if current is None else current.copy()
        if not delayed:
            return current
        previous, self._previous_download = self._previous_download, current
        return previous


class inTOP(TOP):
    opType = "inTOP"

    def _image(self):
        source = self.parent().inputs
        return source[0]._image() if source else None


class outTOP(TOP):
    opType = "outTOP"

    def _image(self):
        return self.inputs[0]._image() if self.inputs else None


class fitTOP(TOP):
    opType = "fitTOP"
    # Only the entry the component uses, as published build scripts spell it; the others are not modelled.
    BUILTIN = {**_COMMON_TOP_PARS, "fit": ("Menu", "fitoutside", ("fitoutside",))}

    def _image(self):
        image = self.inputs[0]._image() if self.inputs else None
        if image is None or self.par.outputresolution.val != "custom":
            return image
        return _cover(image, self.par.resolutionh.val, self.par.resolutionw.val)


def _cover(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale (nearest pixel) to cover height x width, then crop the middle."""
    scale = max(height / image.shape[0], width / image.shape[1])
    rows = ((np.arange(height) + (image.shape[0] * scale - height) / 2) / scale).astype(int)
    cols = ((np.arange(width) + (image.shape[1] * scale - width) / 2) / scale).astype(int)
    return image[np.clip(rows, 0, image.shape[0] - 1)][:, np.clip(cols, 0, image.shape[1] - 1)]


class scriptTOP(TOP):
    opType = "scriptTOP"
    BUILTIN = {**_COMMON_TOP_PARS,
               "callbacks": ("DAT", "", ()),
               "setuppars": ("Pulse", False, ()),
               "modoutsidecook": ("Toggle", False, ())}

    def __init__(self, parent, name):
        super().__init__(parent, name)
        self.copied: np.ndarray | None = None  # the last array given to copyNumpyArray, as given

    def _created(self) -> None:
        callbacks = self.parent().create(textDAT, f"{self.name}_callbacks")
        callbacks.text = "def onCook(scriptOp):\n    return\n"
        self.par.callbacks = callbacks.name

    def copyNumpyArray(self, array: np.ndarray) -> None:
        if not (self._cooking or self.par.modoutsidecook.val):
            raise RuntimeError("copyNumpyArray outside a cook needs Modify Outside of Cook on")
        if not isinstance(array, np.ndarray) or array.ndim != 3 or not 1 <= array.shape[2] <= 4:
            raise ValueError(f"expected a [height, width, 1-4] array, got {getattr(array, 'shape', array)}")
        if array.dtype not in (np.uint8, np.uint16, np.float32):
            raise TypeError(f"copyNumpyArray takes uint8, uint16 or float32, not {array.dtype}")
        self.copied = array.copy()

    def _cook(self) -> None:
        callbacks = self.par.callbacks.eval()
        if callbacks is not None:
            callbacks.module.onCook(self)

    def _image(self):
        if self.copied is None:
            return None
        scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(self.copied.dtype, 1.0)
        image = np.zeros((*self.copied.shape[:2], 4), np.float32)
        image[..., 3] = 1.0
        image[..., : self.copied.shape[2]] = self.copied / scale
        return image


# ----------------------------------------------------------------------------------- DATs


class DAT(OP):
    BUILTIN = {"file": ("File", "", ()), "syncfile": ("Toggle", False, ())}

    def __init__(self, parent, name):
        super().__init__(parent, name)
        self._text = ""
        self._module: types.ModuleType | None = None
        self._module_source: str | None = None

    @property
    def text(self) -> str:
        if self.par.syncfile.val and self.par.file.val:
            return Path(self.par.file.val).read_text()
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._text = value

    @property
    def module(self) -> types.ModuleType:
        source = self.text
        if self._module is None or source != self._module_source:
            module = types.ModuleType(self.name)
            module.__dict__.update(me=self, op=self.op, parent=self.parent,
                                   __builtins__={**vars(builtins), "__import__": self._import})
            # Named after its file when it has one, so that tracebacks show the lines.
            filename = self.par.file.val if self.par.syncfile.val and self.par.file.val else f"<DAT {self.path}>"
            exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)
            self._module, self._module_source = module, source
        return self._module

    def _description(self) -> dict:
        return {**super()._description(), "text": self._text}

    def _restore(self, description: dict) -> None:
        super()._restore(description)
        self._text = description["text"]

    def _import(self, name, globals=None, locals=None, fromlist=(), level=0):
        """TouchDesigner's import: a DAT of that name in this DAT's component comes first."""
        dat = self._parent._children.get(name) if level == 0 else None
        if isinstance(dat, DAT):
            return dat.module
        return builtins.__import__(name, globals, locals, fromlist, level)



class textDAT(DAT):
    opType = "textDAT"


class Cell:
    def __init__(self, val: str):
        self.val = val


class tableDAT(DAT):
    opType = "tableDAT"

    def __init__(self, parent, name):
        super().__init__(parent, name)
        self._rows: list[list[str]] = []

    def rows(self) -> list[list[Cell]]:
        return [[Cell(value) for value in row] for row in self._rows]

    def appendRow(self, cells) -> None:
        self._rows.append([str(c) for c in cells])

    def _description(self) -> dict:
        return {**super()._description(), "rows": self._rows}

    def _restore(self, description: dict) -> None:
        super()._restore(description)
        self._rows = [list(row) for row in description["rows"]]


class executeDAT(DAT):
    opType = "executeDAT"
    BUILTIN = {**DAT.BUILTIN, **{name: ("Toggle", name == "active", ()) for name in
                                 ("active", "start", "create", "exit", "framestart", "frameend")}}


class parameterexecuteDAT(DAT):
    opType = "parameterexecuteDAT"
    BUILTIN = {**DAT.BUILTIN,
               "active": ("Toggle", True, ()),
               "op": ("OP", "", ()),
               "pars": ("Str", "", ()),
               "custom": ("Toggle", True, ()),
               "builtin": ("Toggle", True, ()),
               "valuechange": ("Toggle", True, ()),
               "onpulse": ("Toggle", True, ())}

    def watches(self, par: Par) -> bool:
        if not self.par.active.val or self.par.op.eval() is not par.owner:
            return False
        if not (self.par.custom.val if par.isCustom else self.par.builtin.val):
            return False
        return any(fnmatch.fnmatchcase(par.name, pattern) for pattern in self.par.pars.val.split())


# ------------------------------------------------------------------------------- the world


class _World:
    def __init__(self):
        self.root = baseCOMP(None, "")
        self.frame = 0
        self.pending_inits: list = []

    def nodes(self):
        for node in _walk(self.root):
            if node.valid:
                yield node

    def parameter_changed(self, par: Par, previous) -> None:
        if par.owner.isCOMP and par.name == "ext0object":
            return
        for dat in self._parameter_executes(par):
            if dat.par.valuechange.val and hasattr(dat.module, "onValueChange"):
                dat.module.onValueChange(par, previous)

    def parameter_pulsed(self, par: Par) -> None:
        if par.owner.isCOMP and par.name == "reinitextensions":
            par.owner._initialize_extensions()
            return
        for dat in self._parameter_executes(par):
            if dat.par.onpulse.val and hasattr(dat.module, "onPulse"):
                dat.module.onPulse(par)

    def _parameter_executes(self, par: Par):
        return [n for n in self.nodes() if isinstance(n, parameterexecuteDAT) and n.watches(par)]

    def executes(self, condition: str):
        return [n for n in self.nodes() if isinstance(n, executeDAT) and n.par.active.val and n.par[condition].val]


_world = _World()


def op(path: str) -> OP | None:
    return _find(_world.root, path)


class App:
    """`app`: the application's installation (binFolder: the folder of its binaries)."""

    binFolder = str(Path(sys.executable).parent)


app = App()


# ----------------------------------------------------------------------------- test drivers


def install() -> types.ModuleType:
    """A fresh project at /project1, and this module as sys.modules['td']."""
    global _world
    _world = _World()
    _world.root.create(baseCOMP, "project1")
    module = sys.modules[__name__]
    sys.modules["td"] = module
    return module


def run_frame() -> None:
    """One frame: every active Execute DAT's onFrameStart, then onInitTD of new extensions."""
    _world.frame += 1
    for dat in _world.executes("framestart"):
        dat.module.onFrameStart(_world.frame)
    inits, _world.pending_inits = _world.pending_inits, []
    for extension in inits:
        extension.onInitTD()


def quit_project() -> None:
    """TouchDesigner quitting: every active Execute DAT's onExit."""
    for dat in _world.executes("exit"):
        dat.module.onExit()


def reopen_project() -> None:
    """The project opened again in a new TouchDesigner session (as it was saved): every DAT's
    module is made afresh on its next use and every COMP's extensions initialise anew."""
    for node in list(_world.nodes()):
        if isinstance(node, DAT):
            node._module = None
        elif node.isCOMP and node.par.ext0object.val:
            node._initialize_extensions()
