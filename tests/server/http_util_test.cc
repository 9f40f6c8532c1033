#include "server/http_util.h"

#include <atomic>
#include <thread>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "httplib.h"

namespace pds::server {
namespace {

TEST(JsonTextDepth, CountsBracketsOutsideStrings) {
  EXPECT_EQ(JsonTextDepth("1"), 0);
  EXPECT_EQ(JsonTextDepth(R"({"a": [1, {"b": []}]})"), 4);
  EXPECT_EQ(JsonTextDepth(R"(["[[[\"{{", {}])"), 2);
}

// A server whose one handler waits up to `hold` for its client to leave, noting what it saw.
class ConnectionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_.Get("/wait", [this](const httplib::Request& req, httplib::Response& res) {
      ClientConnection connection(req, absl::Milliseconds(50));
      const absl::Time start = absl::Now();
      while (absl::Now() - start < hold_) {
        if (connection.Gone()) {
          noticed_after_ = absl::Now() - start;
          break;
        }
        absl::SleepFor(absl::Milliseconds(10));
      }
      handled_.Notify();
      res.set_content("waited", "text/plain");
    });
    auto port = ListenInBackground(server_, "127.0.0.1", 0, thread_, "test");
    ASSERT_TRUE(port.ok()) << port.status();
    port_ = *port;
  }
  void TearDown() override {
    server_.stop();
    if (thread_.joinable()) thread_.join();
  }

  httplib::Server server_;
  std::thread thread_;
  int port_ = 0;
  absl::Duration hold_ = absl::Seconds(10);
  absl::Duration noticed_after_ = absl::InfiniteDuration();
  absl::Notification handled_;
};

TEST_F(ConnectionTest, AClientThatLeavesIsNoticed) {
  httplib::Client client("127.0.0.1", port_);
  client.set_read_timeout(0, 300000);  // gives up after 0.3 s and closes the socket
  EXPECT_FALSE(client.Get("/wait"));
  client.stop();
  ASSERT_TRUE(handled_.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_GE(noticed_after_, absl::Milliseconds(250));
  EXPECT_LT(noticed_after_, absl::Seconds(2));
}

TEST_F(ConnectionTest, AClientThatWaitsIsNotGone) {
  hold_ = absl::Milliseconds(600);
  httplib::Client client("127.0.0.1", port_);
  client.set_keep_alive(true);  // its socket stays open, idle, while the handler watches it
  auto res = client.Get("/wait");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->body, "waited");
  EXPECT_EQ(noticed_after_, absl::InfiniteDuration());
}

}  // namespace
}  // namespace pds::server
