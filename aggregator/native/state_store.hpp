// The aggregator's state database (aggregator/store.py, schema 2) as an ingest worker uses it:
// follow the leader's rounds, and group-commit accepted updates with this worker's partial sum.
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace edgefl::ingest {

// The database could not be read or written; what() is one line.
struct StoreError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct AcceptedRow {
  std::string update_id, slot;
  int64_t num_samples = 0;
  double weight = 0;
};

// What a worker stored of one round (the partials table).
struct PartialRow {
  std::string snapshot;  // safetensors blob: float64 sums plus "/weight" and "/count"; "" for none
  double weight = 0;
  std::string metric_sums = "{}";  // JSON
  int64_t bytes = 0;
};

enum class Commit { kDone, kRoundClosed, kSlotTaken };

class StateStore {
 public:
  explicit StateStore(const std::string& path);
  ~StateStore();
  StateStore(const StateStore&) = delete;
  StateStore& operator=(const StateStore&) = delete;

  std::optional<int64_t> latest_round();
  // The newest global's round and safetensors blob; nullopt while there is none.
  std::optional<std::pair<int64_t, std::string>> latest_global();
  bool is_accepted(const std::string& update_id);
  bool slot_reported(int64_t round, const std::string& slot);
  std::optional<PartialRow> partial(int64_t round, const std::string& worker);
  std::optional<std::string> rejections(const std::string& worker);  // JSON, as last stored
  // One transaction: the round must still be the newest, no slot or id may be counted yet;
  // then the rows, the partial sum (count adds up) and the rejection counts.
  Commit accept_partial(const std::string& worker, int64_t round,
                        const std::vector<AcceptedRow>& rows, const PartialRow& partial,
                        const std::string& rejections_json);
  void record_rejections(const std::string& worker, const std::string& rejections_json);

 private:
  sqlite3_stmt* prepare(const char* sql);
  void exec(const char* sql);
  [[noreturn]] void fail(const std::string& what);

  sqlite3* db_ = nullptr;
  std::vector<sqlite3_stmt*> statements_;
  sqlite3_stmt *latest_round_, *latest_global_, *is_accepted_, *slot_reported_, *partial_,
      *rejections_, *insert_accepted_, *upsert_partial_, *record_rejections_;
};

}  // namespace edgefl::ingest
