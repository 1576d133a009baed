// The operator namespace every kernel registers under: torch.ops.<ENGINE_NAMESPACE>.*.
// setup.py and the first-use (ninja) build leave it at `engine`, the namespace engine/*.py calls.
// CMakeLists.txt sets it to `engine_standalone` by default: a namespace may be defined
// (TORCH_LIBRARY) by one loaded library only, and a second definition aborts the process from
// inside dlopen, so the CMake library must not claim `engine` when engine._C may load too.
// Use it as TORCH_LIBRARY_IMPL(ENGINE_NAMESPACE, CPU, m): torch's macros expand it to the name.
#pragma once

#ifndef ENGINE_NAMESPACE
#define ENGINE_NAMESPACE engine
#endif
