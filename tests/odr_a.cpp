// Two translation units that include every core header and instantiate the same templates: a
// non-inline definition anywhere in the headers fails to link (ODR).
#include <lora/lora.hpp>

double odr_probe_a() {
  lora::linear<double> l(lora::matrix<double>::Ones(2, 3));
  l.add_adapter("a");
  lora::rng r(1);
  return l.infer(lora::matrix<double>::Ones(1, 3)).sum() + r.uniform() + lora::scaling_of({});
}
