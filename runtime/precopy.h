// Live migration's destination side: precopy rounds while the source's
// owner keeps writing, then the switchover that leaves the rest to
// postcopy.
//
// Round 1 is the background pull of every page. Each later round asks the
// source which pages were written since the round before began (a write
// epoch), takes those back here (discarded, missing again) and lets the
// pull fetch them once more. Once what is written could move within the
// downtime budget (or after the round limit, or at once when the writer
// outpaces the pull), the source's owner pauses its writers, the last
// written set is taken back, and the application may start: demand faults
// and the pull take the rest. A page fetched in a round was fetched after
// the epoch that round began at, so any write that could make it stale is
// reported by a later harvest: none is missed.
#pragma once

#include <cstdint>

#include "pagewire/region.h"

namespace pagewire {

class FaultEngine;
class SourceControl;

// Runs on an engine just started with its completion held, from the epoch
// the source closed before the engine fetched anything. Returns once the
// source stands still and nothing stale is left here; fills the engine's
// MigrationReport. Throws Error when the region fails or the source cannot
// be asked.
void run_precopy(FaultEngine& engine, SourceControl& control, uint64_t first_epoch, const PrecopyOptions& options);

}  // namespace pagewire
