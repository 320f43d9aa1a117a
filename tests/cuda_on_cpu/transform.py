"""Turn a .cu file into C++ that g++ compiles against the CUDA-on-CPU runtime, and describe it.

Only what C++ cannot parse is rewritten, and every line stays where it was (a `#line` directive
points compiler diagnostics and sanitizer reports at the original .cu file and line):

    extern __shared__ T name[];      ->  T* name = reinterpret_cast<T*>(::cudaemu::dyn_smem());
    __shared__ T name[a][b];         ->  static T name[a][b]; ::cudaemu::shared_decl(&name, sizeof(name));
    __shared__ T name;               ->  static T name; ::cudaemu::shared_decl(&name, sizeof(name));
    kern<T><<<g, b, s, st>>>(args)   ->  ::cudaemu::launcher("kern<T>", "file.cu:LINE", kern<T>, g, b, s, st)(args)
    TORCH_LIBRARY_IMPL(medconv, CUDA, m) { m.impl("op", &fn); }
                                     ->  TORCH_LIBRARY_FRAGMENT(cudaemu, m) { m.def("op", &fn); }

The last rule exposes every CUDA op of the file, unchanged (argument checks, launch configuration,
workspaces and all), as torch.ops.cudaemu.<op> on CPU tensors; the schema is inferred from the C++
signature. Other TORCH_LIBRARY_IMPL blocks (autocast) are compiled but not registered (see
stand_ins/ATen/cuda/CUDAContext.h).

describe() lists what the file holds: __global__ kernels, launch sites and exported ops; the runner
uses it to prove that every kernel was launched and every op was tested.

Usage: python transform.py in.cu out.cpp    (prints the description as JSON)
"""
import json
import re
import sys

_GLOBAL = re.compile(r"__global__\s+(?:void\s+)?(?:__launch_bounds__\s*\([^)]*\)\s*)?(?:void\s+)?(\w+)\s*\(")
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_EXT_SHARED = re.compile(r"extern\s+__shared__\s+([^;\[]*?)\s*\b(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"__shared__\s+([^;\[=]*?\s)(\w+)((?:\s*\[[^\]]*\])*)\s*;")
_CUDA_IMPL = re.compile(r"TORCH_LIBRARY_IMPL\s*\(\s*medconv\s*,\s*CUDA\s*,\s*(\w+)\s*\)\s*\{")
_IMPL_CALL = re.compile(r"\.impl\s*\(\s*\"(\w+)\"")


def _line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def _block_end(text, open_brace):
    """Index just past the brace that closes the block opened at text[open_brace]."""
    depth = 0
    for i in range(open_brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError("unbalanced braces after offset %d" % open_brace)


def _strip_comments(text):
    """Comments blanked out (newlines kept, so offsets and line numbers stay valid)."""
    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    return re.sub(r"//[^\n]*|/\*.*?\*/", blank, text, flags=re.S)


def describe(text, name):
    """{'kernels': [...], 'launches': [{'kernel', 'site'}], 'ops': [...]} of one .cu source."""
    code = _strip_comments(text)
    kernels = sorted(set(_GLOBAL.findall(code)))
    launches = [{"kernel": m.group(1).split("<")[0], "site": "%s:%d" % (name, _line_of(code, m.start()))}
                for m in _LAUNCH.finditer(code)]
    ops = []
    for m in _CUDA_IMPL.finditer(code):
        ops += _IMPL_CALL.findall(code[m.end() - 1:_block_end(code, m.end() - 1)])
    return {"kernels": kernels, "launches": launches, "ops": ops}


def transform(text, name, path):
    """The C++ translation of one .cu source (see the module docstring)."""
    code = _strip_comments(text)  # patterns are searched here, so commented-out code is left alone

    def ext_shared(m):
        decl = re.sub(r"__align__\(\s*\d+\s*\)", "", m.group(1)).strip()
        return "%s* %s = reinterpret_cast<%s*>(::cudaemu::dyn_smem());" % (decl, m.group(2), decl)

    def shared(m):
        return "static %s%s%s; ::cudaemu::shared_decl(&%s, sizeof(%s));" % (
            m.group(1), m.group(2), m.group(3), m.group(2), m.group(2))

    def launch(m):
        kname = m.group(1)
        return '::cudaemu::launcher("%s", "%s:%d", %s, %s)(' % (
            kname, name, _line_of(text, m.start()), kname, m.group(2))

    def cuda_impl(m):
        end = _block_end(text, m.end() - 1)
        body = re.sub(r"\.impl\s*\(", ".def(", text[m.end():end])
        return "TORCH_LIBRARY_FRAGMENT(cudaemu, %s) {%s" % (m.group(1), body), end

    # Rewrite in one left-to-right pass over the original text, so that the line numbers the
    # launch rule records are those of the .cu file.
    out, pos = [], 0
    rules = [(_EXT_SHARED, ext_shared), (_SHARED, shared), (_LAUNCH, launch)]
    while True:
        best = None
        for rx, fn in rules:
            m = rx.search(code, pos)
            if m and (best is None or m.start() < best[0].start()):
                best = (m, fn)
        mi = _CUDA_IMPL.search(code, pos)
        if mi and (best is None or mi.start() < best[0].start()):
            new, end = cuda_impl(mi)
            out += [text[pos:mi.start()], new]
            pos = end
            continue
        if best is None:
            break
        m, fn = best
        # the match was made on the comment-free copy; redo it on the same span of the original
        m2 = [r for r, f in rules if f is fn][0].match(text, m.start())
        if m2 is None or m2.end() != m.end():
            raise ValueError("%s:%d: cannot rewrite %r (a comment inside it?)" %
                             (name, _line_of(text, m.start()), text[m.start():m.end()]))
        out += [text[pos:m.start()], fn(m2)]
        pos = m.end()
    out.append(text[pos:])
    s = "".join(out)
    left = _strip_comments(s)
    if "<<<" in left or "__shared__" in left:
        raise ValueError("%s: CUDA syntax the rewrite rules do not cover is left (<<< or __shared__)" % name)
    assert s.count("\n") == text.count("\n"), "the rewrite must keep every line in place"
    return '#include "cudaemu.h"\n#line 1 "%s"\n%s' % (path, s)


def main(argv):
    src, dst = argv[1], argv[2]
    with open(src) as f:
        text = f.read()
    name = src.rsplit("/", 1)[-1]
    with open(dst, "w") as f:
        f.write(transform(text, name, src))
    print(json.dumps(describe(text, name), indent=1))


if __name__ == "__main__":
    main(sys.argv)
