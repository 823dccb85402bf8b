// Two translation units that include every core header and instantiate the same templates: a
// non-inline definition anywhere in the headers fails to link (ODR).
#include <lora/lora.hpp>

double odr_probe_b() {
  lora::linear<double> l(lora::matrix<double>::Ones(2, 3));
  l.add_adapter("a");
  lora::rng r(2);
  return l.infer(lora::matrix<double>::Ones(1, 3)).sum() + r.uniform() + lora::scaling_of({});
}

#include <gtest/gtest.h>

double odr_probe_a();

TEST(odr, both_translation_units_link_and_agree) {
  EXPECT_DOUBLE_EQ(odr_probe_a() - lora::rng(1).uniform(), odr_probe_b() - lora::rng(2).uniform());
}
