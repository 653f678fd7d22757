// Must not compile: constView of a column-major tensor would read another tensor's data.
#include <kattn/kattn.hpp>

int main() {
  Eigen::Tensor<float, 3> column_major(2, 3, 4);  // Eigen's default layout
  column_major.setZero();
  const auto view = kattn::constView<float, 3>(column_major);
  (void)view;
}
